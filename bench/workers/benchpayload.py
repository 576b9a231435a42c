"""A sizeable import: several standard library packages and a few MB of module data.

Imported by the memory benchmark's worker module, by gdriver (before it forks) and by
standalone processes, so all of them carry the same weight.
"""

import asyncio  # noqa: F401
import decimal
import email.message
import email.parser
import email.policy  # noqa: F401
import http.client  # noqa: F401
import json  # noqa: F401
import sqlite3  # noqa: F401
import xml.etree.ElementTree as ET

ITEMS = 20_000

#: about 7 MB of ordinary Python objects (dicts, lists, strings, Decimals)
TABLE = {
    f"item-{i:06d}": {
        "id": i,
        "name": f"product number {i}",
        "price": decimal.Decimal(i) / 100,
        "tags": [f"tag{i % 7}", f"group{i % 13}"],
    }
    for i in range(ITEMS)
}

#: a parsed XML document, another common kind of module-level data
CATALOG = ET.fromstring(
    "<catalog>"
    + "".join(f'<item id="{i}"><name>n{i}</name></item>' for i in range(2_000))
    + "</catalog>"
)
