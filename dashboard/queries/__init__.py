"""What the dashboard shows, one module per view, as SQL -> pandas DataFrames. No Streamlit here: every function takes a
psycopg connection, passes every value as a bound parameter, and is tested on its own.

Ids, timestamps and JSON are returned display-ready (uuids and LSNs as text, durations in seconds)
so that the layout never has to convert types.
"""
