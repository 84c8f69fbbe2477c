"""Fine-tuning a pretrained BERT on a labelled text task: the flags (config), the labelled data
(data), the model and its tokenizer (model), the loop around the DeepSpeed engine (trainer) and
the report (report). The command is pipeline/finetune.py."""
