"""``python -m tuning`` lists the commands."""
print(
    "Heimdall Tune commands:\n"
    "  python -m tuning.data      generate | describe | list | verify | import | delete datasets\n"
    "  python -m tuning.services  up | down | status  (local PostgreSQL + S3 server for development)\n"
)
