"""The authors' official CellPLM releases."""

from ._download import OFFICIAL_RELEASES, OfficialRelease, cache_dir, official_files

__all__ = ["OFFICIAL_RELEASES", "OfficialRelease", "cache_dir", "official_files"]
