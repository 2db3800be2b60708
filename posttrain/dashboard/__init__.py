"""Read-only web views over the services (jobs, a job's curves and log, datasets), mounted by api/app.py."""
