"""MLflow: the tracking client, the buffered logger the training loop writes through, and the
study's saved view in the UI."""
