"""Thin launcher: the web UI lives inside the installed package (``resunet/webui/``).

Start it with ``resunet app`` (it passes the page's Streamlit settings, ``resunet/webui/streamlit_config.toml``).
From a checkout, ``streamlit run app/webui.py --server.address 127.0.0.1`` runs the same page.
"""

import runpy

runpy.run_module("resunet.webui.streamlit_app", run_name="__main__")
