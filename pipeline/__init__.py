"""BERT pretraining and fine-tuning on DeepSpeed."""
