"""kubetune operator: reconciles FineTuneJob resources into batch/v1 Jobs."""
