"""A moto S3 server that handles one request at a time: `python tests/moto_single.py` prints its port.

moto's threaded server checks `If-Match` / `If-None-Match` and then writes in two steps, so two request threads
can both pass the check; S3 itself makes the pair atomic. Serving requests one by one restores that atomicity,
so races between promoters test the promoters' use of conditional writes, not moto's threading.
"""

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

if __name__ == "__main__":
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False)
    print(server.server_port, flush=True)
    server.serve_forever()
