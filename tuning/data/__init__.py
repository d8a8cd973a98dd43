"""The data stage: the catalogue command (cli), the Ray Data feature pipeline, dataset descriptions."""
