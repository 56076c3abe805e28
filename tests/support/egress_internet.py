# "The internet" of the egress tests, run in its own namespace on 198.18.0.2:
# - DNS (udp/53): names given as NAME=ADDRESS arguments answer with that A record, every other
#   name NXDOMAIN; each query is printed ("dns NAME").
# - HTTPS (tcp/443, certificate and key from $CERT/$KEY; none without $CERT) and HTTP (tcp/80, tcp/8080): answer
#   "hello HOST" (the request's Host header); path /slow waits 2 s first; /big?N sends N bytes.
# - An OpenAI-compatible model (POST .../chat/completions, streamed or not) that answers every
#   chat with LLM_REPLY: a whole-file edit of hello.txt in aider's "whole" format. Each request
#   is printed ("llm HOST PATH MODEL").
import json, os, socket, ssl, struct, sys, threading, time

ADDR = "198.18.0.2"
names = dict(a.split("=", 1) for a in sys.argv[1:])
LLM_REPLY = "hello.txt\n```\nHello from the stub model, through agentvm's egress proxy.\n```\n"


def chat(conn, host, path, head, data):
    length = int(next((l.split(":", 1)[1] for l in head[1:] if l.lower().startswith("content-length:")), "0"))
    body = data.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    req = json.loads(body or b"{}")
    print("llm", host, path, req.get("model"), flush=True)
    base = {"id": "chatcmpl-stub", "created": int(time.time()), "model": req.get("model", "stub")}
    if req.get("stream"):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for delta, finish in (({"role": "assistant", "content": LLM_REPLY}, None), ({}, "stop")):
            event = dict(base, object="chat.completion.chunk",
                         choices=[{"index": 0, "delta": delta, "finish_reason": finish}])
            conn.sendall(b"data: " + json.dumps(event).encode() + b"\n\n")
        conn.sendall(b"data: [DONE]\n\n")
        return
    reply = json.dumps(dict(
        base, object="chat.completion",
        choices=[{"index": 0, "message": {"role": "assistant", "content": LLM_REPLY}, "finish_reason": "stop"}],
        usage={"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20})).encode()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(reply), reply))


def dns():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ADDR, 53))
    while True:
        q, peer = s.recvfrom(512)
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode())
            i += 1 + q[i]
        name = ".".join(labels).lower()
        print("dns", name, flush=True)
        head = q[:2] + b"\x81\x80" + q[4:6]
        question = q[12:i + 5]
        if name in names:
            ip = socket.inet_aton(names[name])
            r = head + b"\x00\x01\x00\x00\x00\x00" + question + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip
        else:
            r = q[:2] + b"\x81\x83" + q[4:6] + b"\x00\x00\x00\x00\x00\x00" + question
        s.sendto(r, peer)


def serve(conn):
    try:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n")[0].decode(errors="replace").split("\r\n")
        path = head[0].split(" ")[1]
        host = next((l.split(":", 1)[1].strip() for l in head[1:] if l.lower().startswith("host:")), "-")
        if head[0].startswith("POST ") and path.endswith("/chat/completions"):
            chat(conn, host, path, head, data)
            return
        if path == "/slow":
            time.sleep(2)
        if path.startswith("/big?"):
            n = int(path[5:])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % n)
            block = b"x" * 65536
            while n > 0:
                conn.sendall(block[:min(n, len(block))])
                n -= len(block)
            return
        body = ("hello " + host).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except Exception as e:
        print("serve error", e, flush=True)
    finally:
        try:
            conn.close()
        except Exception:
            pass


def listen(port, tls):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ADDR, port))
    s.listen(512)
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
    while True:
        c, _ = s.accept()

        def handle(c=c):
            if ctx:
                try:
                    c.settimeout(30)
                    c = ctx.wrap_socket(c, server_side=True)
                except Exception as e:
                    print("tls error", e, flush=True)
                    c.close()
                    return
            serve(c)

        threading.Thread(target=handle, daemon=True).start()


threading.Thread(target=dns, daemon=True).start()
for port, tls in ((443, True), (80, False), (8080, False)):
    if tls and "CERT" not in os.environ:
        continue  # no certificate given: no HTTPS
    threading.Thread(target=listen, args=(port, tls), daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(3600)
