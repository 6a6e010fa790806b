# Sourced by the bench scripts: installs the Debian/Ubuntu packages given for the commands
# that are missing, as `install_missing command=package ...`.
install_missing() {
    local need=() pair
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null || [ -x "/usr/sbin/${pair%%=*}" ] || need+=("${pair#*=}")
    done
    if ((${#need[@]})); then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        echo "installing ${need[*]}" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    export PATH="$PATH:/usr/sbin:/sbin"
}
