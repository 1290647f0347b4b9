"""failover.service.dispatch_ready: a socket closed by an earlier handler of the same batch
is skipped (seen: `hasync group delete` closed the advert sockets while one of them was in
the ready batch; the read raised EBADF and the daemon died)."""

import selectors
import socket

from failover.service import dispatch_ready


def test_a_socket_closed_by_an_earlier_handler_is_not_read():
    sel = selectors.DefaultSelector()
    a_in, a_out = socket.socketpair()
    b_in, b_out = socket.socketpair()
    read = []

    def close_the_other(sock):
        read.append(sock.recv(16))
        sel.unregister(b_in)
        b_in.close()  # a reconfiguration, in the middle of the batch

    def plain_read(sock):
        read.append(sock.recv(16))  # raises OSError (EBADF) on a closed socket

    sel.register(a_in, selectors.EVENT_READ, close_the_other)
    sel.register(b_in, selectors.EVENT_READ, plain_read)
    a_out.send(b"a")
    b_out.send(b"b")
    events = sel.select(1.0)
    events.sort(key=lambda ev: ev[0].fileobj is not a_in)  # the closing handler runs first
    assert len(events) == 2
    dispatch_ready(events)
    assert read == [b"a"]
    for s in (a_in, a_out, b_out):
        s.close()
    sel.close()
