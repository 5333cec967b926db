/* amqp-ceiling: what RabbitMQ itself allows a consumer with a given prefetch window, for bench/rabbitmq.py.
 *
 *     amqp-ceiling PORT QUEUE COUNT WINDOW
 *
 * Consumes COUNT messages from QUEUE on 127.0.0.1:PORT (guest/guest, vhost /) with basic.qos WINDOW and
 * acks them, one basic.ack(multiple) per read, as celeriac's consumer does; it decodes nothing, runs nothing
 * and stores nothing. Prints "<count> <seconds>", from the first delivery to the last ack sent. A worker with
 * the same window cannot drain faster than this on the same node: the gap between the two is the worker's
 * own cost, the rest is the broker's. */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fail(const char *what)
{
    fprintf(stderr, "amqp-ceiling: %s\n", what);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        return fail("usage: amqp-ceiling PORT QUEUE COUNT WINDOW");
    int port = atoi(argv[1]);
    long count = atol(argv[3]);
    int window = atoi(argv[4]);
    if (port <= 0 || count <= 0 || window <= 0 || window > 65535)
        return fail("PORT, COUNT and WINDOW must be positive (WINDOW at most 65535)");

    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock || amqp_socket_open(sock, "127.0.0.1", port) != AMQP_STATUS_OK)
        return fail("cannot connect");
    amqp_rpc_reply_t r = amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    if (r.reply_type != AMQP_RESPONSE_NORMAL)
        return fail("login refused");
    amqp_channel_open(conn, 1);
    amqp_basic_qos(conn, 1, 0, (uint16_t)window, 0); /* the consumer's own limit, as celeriac sets it */
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(argv[2]), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (amqp_get_rpc_reply(conn).reply_type != AMQP_RESPONSE_NORMAL)
        return fail("cannot consume");

    double start = 0;
    uint64_t last_tag = 0;
    for (long got = 0; got < count;) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers(conn);
        r = amqp_consume_message(conn, &env, NULL, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
            return fail("connection lost");
        if (!got++)
            start = monotonic();
        last_tag = env.delivery_tag;
        amqp_destroy_envelope(&env);
        bool read_all = !amqp_data_in_buffer(conn) && !amqp_frames_enqueued(conn);
        if ((read_all || got == count) && amqp_basic_ack(conn, 1, last_tag, 1) != AMQP_STATUS_OK)
            return fail("cannot ack");
    }
    printf("%ld %.6f\n", count, monotonic() - start);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    return 0;
}
