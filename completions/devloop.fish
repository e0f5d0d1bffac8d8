# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_devloop_global_optspecs
    string join \n c/config= json no-tui context= n/namespace= h/help V/version
end

function __fish_devloop_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_devloop_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_devloop_using_subcommand
    set -l cmd (__fish_devloop_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c devloop -n "__fish_devloop_needs_command" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_needs_command" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_needs_command" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_needs_command" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_needs_command" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_needs_command" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_needs_command" -s V -l version -d 'Print version'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "watch" -d 'Sync, then follow every change until Ctrl-C (the main job)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "sync" -d 'Sync once and exit; the exit code says whether the target is in sync'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "check" -d 'Check devloop.yaml and print what it resolves to'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "doctor" -d 'Check that each target can be used: agent binaries, cluster access, the RBAC verbs devloop needs (printing the minimal Role if any is missing)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "intercept" -d 'Route the calls that reach a service to a process on this machine, with no sync, until Ctrl-C (then they go back to the app)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "env" -d 'Print the target container\'s environment (the first ready pod\'s)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "run" -d 'Run a command here with the target container\'s environment; the cluster Services it names are reached through the agent, at local addresses put in their place'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "status" -d 'What the running `devloop watch` (on this devloop.yaml) is doing (--json: its whole state)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "trigger" -d 'Ask the running `devloop watch` to act on a service: `resync`, `restart`, `run N` (its Nth on_sync command, or one whose command contains N), `intercept on|off`'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, elvish, powershell)'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "down" -d 'Remove what devloop put into targets (agents injected into pods). Safe to run twice, and after a crash'
complete -c devloop -n "__fish_devloop_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c devloop -n "__fish_devloop_using_subcommand watch" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand watch" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand watch" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand watch" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand watch" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand watch" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand sync" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand sync" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand sync" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand sync" -l once -d 'Required: sync once and exit (`devloop watch` follows changes)'
complete -c devloop -n "__fish_devloop_using_subcommand sync" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand sync" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand sync" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand check" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand check" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand check" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand check" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand check" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand check" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand doctor" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -l port -d 'SERVICE_PORT:LOCAL_PORT (repeatable): replaces the service\'s `intercept.ports`' -r
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -l header -d 'NAME=VALUE: only the HTTP/1.1 requests with this header (a personal intercept)' -r
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand intercept" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand env" -l format -d 'dotenv (NAME="value" lines) or json (one object)' -r -f -a "dotenv\t''
json\t''"
complete -c devloop -n "__fish_devloop_using_subcommand env" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand env" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand env" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand env" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand env" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand env" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand run" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand run" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand run" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand run" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand run" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand run" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand status" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand status" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand status" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand status" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand status" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand status" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -l pod -d 'Only this pod of the service' -r
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand trigger" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand completions" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand completions" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand completions" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand completions" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand completions" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand completions" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand down" -s c -l config -d 'The configuration file' -r -F
complete -c devloop -n "__fish_devloop_using_subcommand down" -l context -d 'Kubernetes targets: use this kubeconfig context (overrides `context:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand down" -s n -l namespace -d 'Kubernetes targets: use this namespace (overrides `namespace:`)' -r
complete -c devloop -n "__fish_devloop_using_subcommand down" -l json -d 'Print events as NDJSON (one JSON object per line) for editors and scripts'
complete -c devloop -n "__fish_devloop_using_subcommand down" -l no-tui -d 'Plain lines instead of the dashboard (which `watch` shows on a terminal)'
complete -c devloop -n "__fish_devloop_using_subcommand down" -s h -l help -d 'Print help'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "watch" -d 'Sync, then follow every change until Ctrl-C (the main job)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "sync" -d 'Sync once and exit; the exit code says whether the target is in sync'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "check" -d 'Check devloop.yaml and print what it resolves to'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "doctor" -d 'Check that each target can be used: agent binaries, cluster access, the RBAC verbs devloop needs (printing the minimal Role if any is missing)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "intercept" -d 'Route the calls that reach a service to a process on this machine, with no sync, until Ctrl-C (then they go back to the app)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "env" -d 'Print the target container\'s environment (the first ready pod\'s)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "run" -d 'Run a command here with the target container\'s environment; the cluster Services it names are reached through the agent, at local addresses put in their place'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "status" -d 'What the running `devloop watch` (on this devloop.yaml) is doing (--json: its whole state)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "trigger" -d 'Ask the running `devloop watch` to act on a service: `resync`, `restart`, `run N` (its Nth on_sync command, or one whose command contains N), `intercept on|off`'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, elvish, powershell)'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "down" -d 'Remove what devloop put into targets (agents injected into pods). Safe to run twice, and after a crash'
complete -c devloop -n "__fish_devloop_using_subcommand help; and not __fish_seen_subcommand_from watch sync check doctor intercept env run status trigger completions down help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
