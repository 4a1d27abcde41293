"""What glm-ft adds to the Trainer's optimizer: its parameter groups for a DeepSpeed config's own optimizer, and one
line for a checkpoint whose optimizer state does not fit the run's optimizer."""

from __future__ import annotations

import contextlib

from glm_ft.errors import CheckpointError


def decay_groups(trainer, model) -> list[dict]:
    """The Trainer's AdamW groups: training_args.weight_decay, none on biases and norm weights. transformers hands a
    DeepSpeed config's optimizer one flat list (deepspeed_init), which DeepSpeed then decays as a whole: other
    training than the same training_args give without DeepSpeed or without the section."""
    decay = set(trainer.get_decay_parameter_names(model))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in trained if name in decay], "weight_decay": trainer.args.weight_decay},
            {"params": [p for name, p in trained if name not in decay], "weight_decay": 0.0}]


@contextlib.contextmanager
def optimizer_state_fits(checkpoint):
    try:
        yield
    except ValueError as err:  # torch's optimizer.load_state_dict, about an optimizer built another way
        if checkpoint is None or "parameter group" not in str(err):
            raise
        raise CheckpointError(f"resume: {checkpoint}'s optimizer state does not fit this run's optimizer ({err}); "
                              "was it trained with another method.loraplus_lr_ratio (null or a number), other "
                              "trainable weights, or under a DeepSpeed optimizer section by a glm-ft that decayed "
                              "biases and norm weights too?") from None
