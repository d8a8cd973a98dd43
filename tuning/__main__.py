"""``python -m tuning`` lists every command, one line each, in the order a study uses them."""

COMMANDS = (
    ("tuning.services", "up | down | status: private PostgreSQL + S3 servers for development"),
    ("tuning.data", "generate | describe | list | verify | import | delete datasets"),
    ("tuning.train", "train one network without Ray: the reference and debugging path"),
    ("tuning.run", "the study: prepare data, search with Ray Tune + Optuna, summarise, release the best"),
    ("tuning.register", "export, gate, publish and register a checkpoint, or finish a registration"),
    ("tuning.predict", "locate a transmitter from IQ recordings with an exported model"),
    ("tuning.localcluster", "up | down | status: a real multi-node Ray cluster on this machine"),
)


def usage() -> str:
    """The command list, with ``--help`` as the next step."""
    width = max(len(name) for name, _ in COMMANDS) + len("python -m ")
    lines = [f"  {'python -m ' + name:{width}}  {what}" for name, what in COMMANDS]
    return "Heimdall Tune commands (each takes --help):\n" + "\n".join(lines)


if __name__ == "__main__":
    print(usage())
