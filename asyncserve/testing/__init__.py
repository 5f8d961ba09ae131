"""What the tests and `--model asyncserve/tiny-random` build offline: a tiny checkpoint of any family asyncserve
serves, with a tokenizer trained on a small corpus, to compare against transformers token for token."""
