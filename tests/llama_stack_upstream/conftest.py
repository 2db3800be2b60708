"""posttrain's suite does not collect the vendored Llama Stack tests: they need llama-stack 0.2.23
(Python 3.12) and a server, and run through tests/clients/test_llama_stack_own_tests.py."""

collect_ignore_glob = ["v*"]
