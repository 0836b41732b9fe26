/* pylium-cni, native transport: what a container runtime execs for every pod operation.
 *
 * It carries one invocation to the pylium agent and the agent's answer back, nothing more:
 * the CNI_* environment (percent-encoded in the query) and stdin (the body) go in one
 * `POST /v1/cni` to the agent's unix socket (the config's "socket", else the default); the
 * answer's body is printed as it is and its Pylium-CNI-Exit header is the exit code. The CNI
 * semantics (validation, results, error objects) live in the agent (pylium.cni.handler).
 * This program answers only what it must answer without an agent: VERSION, and a CNI error
 * object when the agent cannot be reached (11 "try again later"; 50 for STATUS) or answers
 * something that is not a CNI answer (999).
 *
 * The versions, default socket, route and header come from pylium.cni.handler/spec as -D
 * flags (pylium.cni.native builds this file): one source for both sides. Stdlib + POSIX
 * only, so it builds with the machine's compiler and links statically. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef PYLIUM_CNI_VERSIONS
#error "build with pylium.cni.native (it passes the versions, socket, route and header)"
#endif

extern char **environ;

static const char *const versions[] = {PYLIUM_CNI_VERSIONS};
#define NVERSIONS (sizeof(versions) / sizeof(versions[0]))
#define LATEST (versions[NVERSIONS - 1])
#define TIMEOUT_S 120
#define MAX_STDIN (16u << 20)

enum { TRY_AGAIN_LATER = 11, PLUGIN_NOT_AVAILABLE = 50, FAILURE = 999 };

static void json_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(out, "\\%c", c);
        else if (c < 0x20 || c == 0x7f || c >= 0x80)
            fprintf(out, "\\u%04x", c); /* bytes, not decoded: still valid JSON */
        else
            fputc(c, out);
    }
    fputc('"', out);
}

static const char *reported_version(const char *asked)
{
    for (size_t i = 0; i < NVERSIONS; i++)
        if (asked && strcmp(asked, versions[i]) == 0)
            return versions[i];
    return LATEST;
}

static int fail(const char *version, int code, const char *msg, const char *details)
{
    printf("{\"cniVersion\": ");
    json_string(stdout, version);
    printf(", \"code\": %d, \"msg\": ", code);
    json_string(stdout, msg);
    printf(", \"details\": ");
    json_string(stdout, details);
    printf("}\n");
    fflush(stdout);
    return 1;
}

/* a minimal scan of the config's top-level string fields "cniVersion" and "socket" ------- */
static const char *skip_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p at '"': the string unescaped into out (empty when it has \u escapes or is too long) */
static const char *scan_string(const char *p, const char *e, char *out, size_t cap)
{
    size_t n = 0;
    int usable = 1;
    for (p++; p < e && *p != '"'; p++) {
        char c = *p;
        if (c == '\\') {
            if (++p >= e)
                return NULL;
            switch (*p) {
            case '"': case '\\': case '/': c = *p; break;
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            default: usable = 0; c = '?'; break; /* \uXXXX: not a path we can use */
            }
        }
        if (n + 1 < cap)
            out[n++] = c;
        else
            usable = 0;
    }
    if (p >= e)
        return NULL;
    out[usable ? n : 0] = '\0';
    return p + 1;
}

static const char *skip_value(const char *p, const char *e)
{
    char scratch[2];
    int depth = 0;
    do {
        p = skip_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == '"') {
            p = scan_string(p, e, scratch, sizeof scratch);
            if (!p)
                return NULL;
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            if (--depth < 0)
                return NULL;
            p++;
        } else if (*p == ',' || *p == ':') {
            if (depth == 0)
                return NULL;
            p++;
        } else {
            while (p < e && !strchr(" \t\r\n,:]}[{\"", *p))
                p++;
        }
    } while (depth > 0);
    return p;
}

static void scan_config(const char *p, size_t len, char *version, char *sock, size_t cap)
{
    const char *e = p + len;
    char key[32];
    p = skip_ws(p, e);
    if (p >= e || *p++ != '{')
        return;
    for (;;) {
        p = skip_ws(p, e);
        if (p >= e || *p == '}' || *p != '"')
            return;
        if (!(p = scan_string(p, e, key, sizeof key)))
            return;
        p = skip_ws(p, e);
        if (p >= e || *p++ != ':')
            return;
        p = skip_ws(p, e);
        char *into = strcmp(key, "cniVersion") == 0 ? version
                   : strcmp(key, "socket") == 0    ? sock : NULL;
        if (into && p < e && *p == '"')
            p = scan_string(p, e, into, cap);
        else
            p = skip_value(p, e);
        if (!p)
            return;
        p = skip_ws(p, e);
        if (p >= e || *p != ',')
            return;
        p++;
    }
}

/* growing buffer ---------------------------------------------------------------------------- */
struct buf { char *data; size_t len, cap; };

static int put(struct buf *b, const void *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

static int put_quoted(struct buf *b, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char enc[3] = {'%', hex[c >> 4], hex[c & 15]};
        int plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
                    || c == '-' || c == '.' || c == '_' || c == '~';
        if (plain ? put(b, s, 1) : put(b, enc, 3))
            return -1;
    }
    return 0;
}

static int read_all(int fd, struct buf *b, size_t limit)
{
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        if (b->len + (size_t)n > limit) {
            errno = EFBIG;
            return -1;
        }
        if (put(b, chunk, (size_t)n))
            return -1;
    }
}

static int write_all(int fd, const char *p, size_t len)
{
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(void)
{
    struct buf in = {0}, req = {0}, ans = {0};
    char version[64] = "", sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)] = "";
    char details[512];
    const char *command = getenv("CNI_COMMAND");

    signal(SIGPIPE, SIG_IGN); /* a peer gone mid-write is an error we report, not death */

    if (read_all(0, &in, MAX_STDIN) < 0) {
        snprintf(details, sizeof details, "stdin: %s", strerror(errno));
        return fail(LATEST, 5, "cannot read the network config from stdin", details);
    }
    if (in.len)
        scan_config(in.data, in.len, version, sock_path, sizeof sock_path);
    const char *reported = reported_version(version);

    if (command && strcmp(command, "VERSION") == 0) {
        printf("{\"cniVersion\": ");
        json_string(stdout, reported);
        printf(", \"supportedVersions\": [");
        for (size_t i = 0; i < NVERSIONS; i++)
            printf("%s\"%s\"", i ? ", " : "", versions[i]);
        printf("]}\n");
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (sock_path[0] != '/')
        snprintf(sock_path, sizeof sock_path, "%s", PYLIUM_CNI_SOCKET);
    int unavailable = command && strcmp(command, "STATUS") == 0
                      ? PLUGIN_NOT_AVAILABLE : TRY_AGAIN_LATER;

    /* the request: environment in the query, stdin as the body */
    char head[256];
    int first = 1;
    if (put(&req, "POST " PYLIUM_CNI_ROUTE "?", strlen("POST " PYLIUM_CNI_ROUTE "?")))
        goto oom;
    for (char **env = environ; *env; env++) {
        if (strncmp(*env, "CNI_", 4) != 0)
            continue;
        const char *eq = strchr(*env, '=');
        if (!eq)
            continue;
        char name[128];
        size_t nlen = (size_t)(eq - *env);
        if (nlen >= sizeof name)
            continue;
        memcpy(name, *env, nlen);
        name[nlen] = '\0';
        if ((!first && put(&req, "&", 1)) || put_quoted(&req, name) || put(&req, "=", 1)
            || put_quoted(&req, eq + 1))
            goto oom;
        first = 0;
    }
    snprintf(head, sizeof head, " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
             "Content-Length: %zu\r\n\r\n", in.len);
    if (put(&req, head, strlen(head)) || (in.len && put(&req, in.data, in.len)))
        goto oom;

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {.tv_sec = TIMEOUT_S};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock_path);
    if (fd < 0)
        goto talk;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        if (errno == ENOENT || errno == ECONNREFUSED) {
            snprintf(details, sizeof details, "%s: %s", sock_path, strerror(errno));
            return fail(reported, unavailable, unavailable == PLUGIN_NOT_AVAILABLE ?
                        "plugin not available: the pylium agent is not running" :
                        "the pylium agent is not running", details);
        }
        goto talk;
    }
    if (write_all(fd, req.data, req.len) < 0 || read_all(fd, &ans, 64u << 20) < 0)
        goto talk;
    close(fd);
    if (ans.len == 0) { /* closed without a word: an agent stopping or restarting */
        snprintf(details, sizeof details, "%s: the connection closed without an answer",
                 sock_path);
        return fail(reported, unavailable, "cannot talk to the pylium agent", details);
    }

    /* the answer: status line, headers, body */
    char *end = strstr(ans.data ? ans.data : "", "\r\n\r\n");
    int status = 0, code = -1;
    if (!end || sscanf(ans.data, "HTTP/1.%*d %d", &status) != 1)
        goto bad;
    *end = '\0';
    size_t body_len = ans.len - (size_t)(end + 4 - ans.data);
    for (char *line = strstr(ans.data, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        size_t hlen = strlen(PYLIUM_CNI_EXIT_HEADER);
        if (strncasecmp(line, PYLIUM_CNI_EXIT_HEADER, hlen) == 0 && line[hlen] == ':') {
            const char *v = line + hlen + 1;
            while (*v == ' ')
                v++;
            code = (v[0] == '0' || v[0] == '1') && (v[1] == '\r' || v[1] == '\0')
                   ? v[0] - '0' : -1;
        }
        if (strncasecmp(line, "Transfer-Encoding:", 18) == 0)
            goto bad; /* the agent sends Content-Length: anything else is not its answer */
    }
    if (status != 200 || code < 0)
        goto bad;
    if (write_all(1, end + 4, body_len) < 0)
        return 1;
    return code;

bad:
    snprintf(details, sizeof details, "%s: HTTP %d", sock_path, status);
    return fail(reported, FAILURE, "the pylium agent answered something that is not a CNI "
                "answer", details);
talk:
    snprintf(details, sizeof details, "%s: %s", sock_path,
             errno == EAGAIN || errno == EWOULDBLOCK ? "no answer within 120s" : strerror(errno));
    return fail(reported, unavailable, errno == EAGAIN || errno == EWOULDBLOCK ?
                "the pylium agent did not answer in time" : "cannot talk to the pylium agent",
                details);
oom:
    return fail(reported, FAILURE, "pylium-cni: out of memory", "");
}
