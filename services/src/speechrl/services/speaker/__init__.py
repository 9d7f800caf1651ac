"""Speaker-similarity service: raw cosine of speaker embeddings (Resemblyzer by default, wespeaker models) as a reward."""
