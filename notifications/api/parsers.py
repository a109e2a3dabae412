"""Request parsing that answers 400, never 500, whatever JSON a client sends."""

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, with input nested past Python's recursion limit a 400 too.

    The standard library's decoder raises RecursionError there, which DRF does not catch.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
