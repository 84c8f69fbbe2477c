"""The fine-tuned classifier as MLflow serves it when its pretraining text was converted.

A model pretrained on ``--convert t2s`` data has a Simplified vocabulary: Traditional input is
mostly ``[UNK]`` to it. Fine-tuning converts its texts (the export's ``training_info.json``
says how), and so must serving: MLflow's transformers flavour cannot, so such a model is
logged as this ``mlflow.pyfunc`` model instead, which converts each text with OpenCC, then
classifies it with the same Hugging Face pipeline the transformers flavour serves (cut to
the fine-tuning length), and answers as it does: a DataFrame of ``label`` and ``score``.
Sentence pairs come as the transformers flavour takes them: ``{"text", "text_pair"}`` dicts,
or a DataFrame with those two columns; both texts are converted.

Logged as MLflow "models from code" (``pipeline/finetuning/report.py``): MLflow copies this file
beside the model and runs it when the model is loaded, so it imports only what the served
environment has (mlflow, pandas, transformers, torch, opencc), nothing of this project.
``model_config``: ``convert`` (the OpenCC configuration), ``max_length``, ``task``.
"""

import mlflow
import pandas as pd


class ConvertedTextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import opencc
        from transformers import pipeline

        config = context.model_config
        self.converter = opencc.OpenCC(config["convert"])
        # Regression: the raw score, as fine-tuning's report has it (no softmax of one logit).
        extra = {"function_to_apply": "none"} if config["task"] == "regression" else {}
        self.classify = pipeline("text-classification", model=context.artifacts["model"], truncation=True,
                                 max_length=int(config["max_length"]), **extra)

    # The hint is the input pyfunc serving gives; _inputs takes a string, a dict, a list or a Series
    # too. A DataFrame hint is one MLflow infers no schema from, so it checks and converts nothing;
    # without a hint it printed a warning, in raw ANSI colour codes, at every fine-tuning.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        inputs = [self._converted(x) for x in _inputs(model_input)]
        return pd.DataFrame(self.classify(inputs), columns=["label", "score"])

    def _converted(self, x):
        """A text, or a pair's two texts, converted; other keys of a dict (an ``idx``) left out,
        and a pair without its second text (None, NaN) classified as its text alone."""
        if not isinstance(x, dict):
            return self.converter.convert(str(x))
        pair = x.get("text_pair")
        if pair is None or (not isinstance(pair, str) and pd.isna(pair)):  # NaN, pd.NA, NaT
            return self.converter.convert(str(x["text"]))
        return {"text": self.converter.convert(str(x["text"])), "text_pair": self.converter.convert(str(pair))}


def _inputs(model_input) -> list:
    """Texts, or sentence pairs ({"text": …, "text_pair": …}, as the transformers flavour takes
    them), from what a pyfunc model is given: a string, a dict, a list, a Series, or a DataFrame
    (its ``text`` and ``text_pair`` columns; its ``text`` column, else its first)."""
    if isinstance(model_input, (str, dict)):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if {"text", "text_pair"} <= set(model_input.columns):
            return [{"text": t, "text_pair": p} for t, p in zip(model_input["text"], model_input["text_pair"])]
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return model_input[column].tolist()
    return list(model_input)


mlflow.models.set_model(ConvertedTextClassifier())
