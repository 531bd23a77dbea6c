"""Downloads and the on-disk cache: resumable verified HTTP fetches, a Hugging Face wrapper, offline mode.

This layer moves bytes and knows nothing of models: it sits above ``files`` and below the weights policy
(``segtorch.weights``), which decides what to fetch. Its modules, each using only those before it:

- ``cache``: the cache folder (``SEGTORCH_HOME``), offline mode, cache file names, the lock and the sha256 sidecars;
- ``fetch``: HTTP(S) downloads into the cache, resumed and verified;
- ``huggingface``: files from a Hugging Face repo, through ``huggingface_hub``'s own cache.
"""
from .cache import CachedFile, cache_lock, cache_name, home, is_offline, offline_var
from .fetch import download, forget, unreachable
from .huggingface import hf_download

__all__ = ["home", "is_offline", "offline_var", "download", "forget", "hf_download", "CachedFile", "cache_lock",
           "cache_name", "unreachable"]
