"""The light side: compose-time schema, key checks, validation and rendering. Imports nothing heavy (no torch,
transformers, peft, deepspeed, mlflow, datasets), so a bad command line fails in about a second."""
