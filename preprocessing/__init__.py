"""Corpus → masked BERT pretraining examples, as an Apache Beam pipeline."""
