"""resunet web UI (Streamlit): ``streamlit_app.py`` is the page; the other modules are its parts."""
