"""The training job: Seq2SeqTrainer with generation-based evaluation, its arguments and metrics."""
