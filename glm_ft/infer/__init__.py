"""What a run trained, used: open a checkpoint, chat, predict, export (THUDM or transformers layout), serve."""
