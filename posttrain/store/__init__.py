"""The only package that touches the database (SQLAlchemy 2 Core; SQLite or PostgreSQL)."""
