"""``p2p-run serve``: a web page for editing photos on the Python API.

- :mod:`p2p_framework.web.controls`: page controls generated from plugins' declared options;
- :mod:`p2p_framework.web.service`: :class:`~p2p_framework.web.service.EditService`, what the
  page does (uploads, runs, cancellation), without any web toolkit;
- :mod:`p2p_framework.web.app`: the Gradio page (``pip install 'p2p-framework[ui]'``), imported
  only by ``p2p-run serve``.

Nothing here is imported by the rest of the package.
"""
