#!/bin/sh
# agentvm power control (installed by agentvm-image as /sbin/shutdown,
# /sbin/poweroff, /sbin/halt and /sbin/reboot). There is no systemd in
# agentvm guests: flush the disks and ask the kernel directly, through
# /proc/sysrq-trigger, so qemu-guest-agent's guest-shutdown works.
# Accepts (and ignores) shutdown(8)'s time and message arguments.

action=poweroff
case "${0##*/}" in
    reboot) action=reboot ;;
esac
for arg in "$@"; do
    case "$arg" in
        -r | --reboot) action=reboot ;;
        -P | -h | -H | --poweroff | --halt | -p) action=poweroff ;;
        -c) exit 0 ;;
    esac
done

sync
if [ "$action" = reboot ]; then
    echo b >/proc/sysrq-trigger
else
    echo o >/proc/sysrq-trigger
fi
# sysrq acts asynchronously; do not return before it takes effect.
sleep 10
