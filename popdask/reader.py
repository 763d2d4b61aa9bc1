"""The raster reader stackstac uses inside each task: sign, read once, close, retry.

stackstac keeps every asset's dataset open until its task ends. With the whole time
column of a tile in one task (what the median needs) that is hundreds of open datasets,
and GDAL makes each new warped dataset slower the more are open: measured on the demo,
53 ms per asset with all kept open against 4–7 ms when each is closed after its read.
:class:`ClosingReader` closes its dataset right after reading (it reopens if read
again), and retries transient read failures with back-off before giving up.

Signed catalogs (the Planetary Computer's SAS tokens last about 45 minutes) are signed here,
inside the read task, right before each open — never when the graph is built, so a run of
many hours never reads with an expired token. stackstac builds its readers with fixed
keyword arguments and pickles them with a fixed state, so the signing mode is the reader's
class: :class:`SigningReader` subclasses, one per signer (:func:`reader_for`). The signed
href lives only for the open: messages, exceptions and the log records of stackstac and
rasterio never carry its query string (:func:`redact`).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Callable

import numpy as np
from rasterio.windows import Window
from stackstac.rio_reader import AutoParallelRioReader

from popdask.gdal import forget

log = logging.getLogger(__name__)

RETRIES = 3
BACKOFF_S = 0.5

_URL = re.compile(r"https?://[^\s'\"<>]+")
_QUERY = re.compile(r"((?:https?://|/)[^\s'\"?<>]*)\?[^\s'\"<>]*")


def redact(text: str) -> str:
    """``text`` with the query string of every URL in it removed (tokens live there)."""
    return _QUERY.sub(r"\1", str(text))


def sign_embedded(path: str, signer: Callable[[str], str]) -> str:
    """Sign every http(s) URL inside a GDAL path with ``signer``.

    Works for a plain URL, ``/vsicurl/https://…`` and subdataset paths such as
    ``HDF5:"/vsicurl/https://…/f.h5"://grid/field``; local paths pass through unchanged.
    """
    return _URL.sub(lambda m: signer(m.group(0)), path)


class _RedactFilter(logging.Filter):
    """Strip URL query strings from the records of loggers that may print a signed href."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_FILTER = _RedactFilter()
for _name in (
    "stackstac.timer",
    "stackstac.rio_reader",
    "rasterio",
    "rasterio._env",
    "rasterio._base",
    "rasterio._io",
    "rasterio.env",
    __name__,
):
    _logger = logging.getLogger(_name)
    if _FILTER not in _logger.filters:
        _logger.addFilter(_FILTER)


class ClosingReader(AutoParallelRioReader):
    """stackstac's reader, closing its dataset after each read and retrying failures."""

    def _clean(self, text: str) -> str:
        return redact(text)

    def read(self, window: Window, **kwargs) -> np.ndarray:
        for attempt in range(RETRIES + 1):
            try:
                return super().read(window, **kwargs)
            except RuntimeError as e:
                forget(self.url)  # GDAL caches failed opens per process: ask again
                text = str(e)
                cause = e.__cause__ or e
                clean, clean_cause = self._clean(text), self._clean(str(cause))
                if attempt == RETRIES:
                    if clean == text:
                        raise
                    raise RuntimeError(clean) from None
                wait = BACKOFF_S * 2**attempt
                log.warning(
                    "read of %s failed (%s); retry %d in %.1f s",
                    redact(self.url),
                    clean_cause,
                    attempt + 1,
                    wait,
                )
                time.sleep(wait)
            finally:
                # Reopened on the next read; a fresh open also bypasses a failed handle.
                self.close()
        raise AssertionError("unreachable")  # pragma: no cover


class SigningReader(ClosingReader):
    """A :class:`ClosingReader` that signs its href inside the task, right before each open.

    Subclasses set :meth:`sign_href`. ``self.url`` stays unsigned (it is what stackstac
    pickles and prints); the signed path exists only while the dataset is opened, and is
    fetched again at every open, so retries and reopens pick up a fresh token.
    """

    @staticmethod
    def sign_href(href: str) -> str:
        """The signed form of one URL (override in subclasses)."""
        raise NotImplementedError

    def _clean(self, text: str) -> str:
        signed = getattr(self, "_signed", None)
        if signed:
            text = str(text).replace(signed, self.url)
        return redact(text)

    def _open(self):
        unsigned = self.url
        signed = sign_embedded(unsigned, type(self).sign_href)
        self._signed = signed
        self.url = signed
        try:
            return super()._open()
        except Exception as e:
            raise RuntimeError(self._clean_with(e, signed, unsigned)) from None
        finally:
            self.url = unsigned

    @staticmethod
    def _clean_with(e: BaseException, signed: str, unsigned: str) -> str:
        text = str(e)
        cause = e.__cause__
        if cause is not None and str(cause) not in text:
            text = f"{text} ({cause})"
        return redact(text.replace(signed, unsigned))


def _planetary_computer_sign(href: str) -> str:
    import planetary_computer  # tokens cached per process, renewed < 60 s before expiry

    return planetary_computer.sign(href)


class PlanetaryComputerReader(SigningReader):
    """Signs Azure Blob hrefs with ``planetary_computer.sign`` (other hosts unchanged)."""

    sign_href = staticmethod(_planetary_computer_sign)


#: Signing mode (``sign:`` in the configuration) → reader class.
SIGNING_READERS: dict[str, type[SigningReader]] = {
    "planetary_computer": PlanetaryComputerReader,
}
_NEEDS = {"planetary_computer": ("planetary_computer", "planetary-computer")}


def reader_for(sign: str | None) -> type[ClosingReader]:
    """The reader class for a signing mode, checked on the client before any task runs.

    Raises
    ------
    ValueError
        For an unknown mode, or when the signer's package is not installed.
    """
    if sign is None:
        return ClosingReader
    if sign not in SIGNING_READERS:
        raise ValueError(
            f"unknown signing method {sign!r}; known: {', '.join(sorted(SIGNING_READERS))}"
        )
    module, package = _NEEDS[sign]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"sign: {sign} needs the {package} package: pip install 'popdask[pc]' "
            f"(or pip install {package})"
        )
    return SIGNING_READERS[sign]
