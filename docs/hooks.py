"""MkDocs hook: the tutorial notebooks (``tutorials/*.ipynb``, outside ``docs_dir``) become pages.

Each notebook is added to the site's files as ``tutorials/<name>.ipynb``, read in place from the
repository's ``tutorials/`` directory (no copy, no symlink), before mkdocs-jupyter turns
notebooks into pages. ``mkdocs.yml`` lists them in ``nav`` under "Tutorials"; other files in
``tutorials/`` (``make_notebooks.py``) are not part of the site. ``mkdocs serve`` also watches
``tutorials/``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps every *.ipynb as a page
def on_files(files: Files, config) -> Files:
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        src_uri = f"tutorials/{notebook.name}"
        if files.get_file_from_path(src_uri) is not None:
            raise ValueError(f"docs/{src_uri} shadows {notebook}: keep notebooks in tutorials/ only")
        # A real file whose source directory is the repository root (not File.generated: the
        # page wrapper of mkdocs-jupyter reads the path from `src_dir`).
        files.append(File(src_uri, src_dir=str(TUTORIALS.parent), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def on_serve(server, config, builder):
    server.watch(str(TUTORIALS))
    return server
