"""The one exception type gptkit raises for bad input.

Its message is a single line that names the problem and the fix; the CLI prints it as
``error: <message>`` and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class GptkitError(Exception):
    """Bad input or state that the user can fix; ``str(err)`` says how."""
