"""A pickle payload for the tests that prove no file Felix reads can run code: unpickling it writes a marker file,
so the marker appearing means a loader executed the file's contents."""

from __future__ import annotations

import pickle


class PicklePayload:
    """Unpickling this writes `marker` (via exec, as a real attack would run any code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def pickle_payload(marker) -> bytes:
    """The pickled bytes of a :class:`PicklePayload` writing `marker`."""
    return pickle.dumps(PicklePayload(marker))
