/* The pod's first container, as Kubernetes' pause: it only holds the network namespace that
 * the app and sidecast containers join, so that either can restart without taking it down. */
#include <signal.h>
#include <unistd.h>

static void stop(int signal) {
    (void)signal;
    _exit(0);
}

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) pause();
}
