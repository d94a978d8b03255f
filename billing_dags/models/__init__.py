"""Models: the SQL model runner, the compiled counter engine, and late-data detection over model inputs."""
