"""Files shipped with the package: the tiny tokenizer model and the script that builds it."""
