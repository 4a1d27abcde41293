"""MLflow: one run per job, sent in the background, surviving outages and kills; comparing a sweep's runs."""
