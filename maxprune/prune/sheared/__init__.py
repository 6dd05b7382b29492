"""Sheared LLaMA: learned gates (`gates`), their train step (`step`), the target plan (`plan`), the token
stream (`data`), the method (`method`)."""
