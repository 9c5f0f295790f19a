"""Generated documentation: pages and snippets rendered from the code and the committed JSON, never typed.

`hooks.py` is the mkdocs hook that adds the generated pages and expands `<!-- gen:... -->` markers in the
hand-written ones; `readme.py` keeps README.md's generated blocks in sync (`make docs`; a test checks them).
"""
