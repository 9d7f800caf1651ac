"""SpeechRL client SDK: audio and tensor codecs, sync and asyncio clients for every service."""
