#compdef devloop

autoload -U is-at-least

_devloop() {
    typeset -A opt_args
    typeset -a _arguments_options
    local ret=1

    if is-at-least 5.2; then
        _arguments_options=(-s -S -C)
    else
        _arguments_options=(-s -C)
    fi

    local context curcontext="$curcontext" state line
    _arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
'-V[Print version]' \
'--version[Print version]' \
":: :_devloop_commands" \
"*::: :->devloop" \
&& ret=0
    case $state in
    (devloop)
        words=($line[1] "${words[@]}")
        (( CURRENT += 1 ))
        curcontext="${curcontext%:*:*}:devloop-command-$line[1]:"
        case $line[1] in
            (watch)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
'*::services -- Only these services (default\: all):_default' \
&& ret=0
;;
(sync)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--once[Required\: sync once and exit (\`devloop watch\` follows changes)]' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
'*::services -- Only these services (default\: all):_default' \
&& ret=0
;;
(check)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
&& ret=0
;;
(doctor)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
'*::services -- Only these services (default\: all):_default' \
&& ret=0
;;
(intercept)
_arguments "${_arguments_options[@]}" : \
'*--port=[SERVICE_PORT\:LOCAL_PORT (repeatable)\: replaces the service'\''s \`intercept.ports\`]:SVC:LOCAL:_default' \
'--header=[NAME=VALUE\: only the HTTP/1.1 requests with this header (a personal intercept)]:NAME=VALUE:_default' \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
':service -- The service in devloop.yaml:_default' \
&& ret=0
;;
(env)
_arguments "${_arguments_options[@]}" : \
'--format=[dotenv (NAME="value" lines) or json (one object)]:FORMAT:(dotenv json)' \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
':service -- The service in devloop.yaml:_default' \
&& ret=0
;;
(run)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
':service -- The service in devloop.yaml:_default' \
'*::command -- The command and its arguments (after `--`):_default' \
&& ret=0
;;
(status)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
&& ret=0
;;
(trigger)
_arguments "${_arguments_options[@]}" : \
'--pod=[Only this pod of the service]:POD:_default' \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
':service:_default' \
':action -- resync, restart, run, intercept:_default' \
'::arg -- For `run`\: which command; for `intercept`\: on or off:_default' \
&& ret=0
;;
(completions)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
':shell:(bash elvish fish powershell zsh)' \
&& ret=0
;;
(down)
_arguments "${_arguments_options[@]}" : \
'-c+[The configuration file]:CONFIG:_files' \
'--config=[The configuration file]:CONFIG:_files' \
'--context=[Kubernetes targets\: use this kubeconfig context (overrides \`context\:\`)]:CONTEXT:_default' \
'-n+[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--namespace=[Kubernetes targets\: use this namespace (overrides \`namespace\:\`)]:NAMESPACE:_default' \
'--json[Print events as NDJSON (one JSON object per line) for editors and scripts]' \
'--no-tui[Plain lines instead of the dashboard (which \`watch\` shows on a terminal)]' \
'-h[Print help]' \
'--help[Print help]' \
'*::services -- Only these services (default\: all):_default' \
&& ret=0
;;
(help)
_arguments "${_arguments_options[@]}" : \
":: :_devloop__subcmd__help_commands" \
"*::: :->help" \
&& ret=0

    case $state in
    (help)
        words=($line[1] "${words[@]}")
        (( CURRENT += 1 ))
        curcontext="${curcontext%:*:*}:devloop-help-command-$line[1]:"
        case $line[1] in
            (watch)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(sync)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(check)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(doctor)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(intercept)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(env)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(run)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(status)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(trigger)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(completions)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(down)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
(help)
_arguments "${_arguments_options[@]}" : \
&& ret=0
;;
        esac
    ;;
esac
;;
        esac
    ;;
esac
}

(( $+functions[_devloop_commands] )) ||
_devloop_commands() {
    local commands; commands=(
'watch:Sync, then follow every change until Ctrl-C (the main job)' \
'sync:Sync once and exit; the exit code says whether the target is in sync' \
'check:Check devloop.yaml and print what it resolves to' \
'doctor:Check that each target can be used\: agent binaries, cluster access, the RBAC verbs devloop needs (printing the minimal Role if any is missing)' \
'intercept:Route the calls that reach a service to a process on this machine, with no sync, until Ctrl-C (then they go back to the app)' \
'env:Print the target container'\''s environment (the first ready pod'\''s)' \
'run:Run a command here with the target container'\''s environment; the cluster Services it names are reached through the agent, at local addresses put in their place' \
'status:What the running \`devloop watch\` (on this devloop.yaml) is doing (--json\: its whole state)' \
'trigger:Ask the running \`devloop watch\` to act on a service\: \`resync\`, \`restart\`, \`run N\` (its Nth on_sync command, or one whose command contains N), \`intercept on|off\`' \
'completions:Print shell completions (bash, zsh, fish, elvish, powershell)' \
'down:Remove what devloop put into targets (agents injected into pods). Safe to run twice, and after a crash' \
'help:Print this message or the help of the given subcommand(s)' \
    )
    _describe -t commands 'devloop commands' commands "$@"
}
(( $+functions[_devloop__subcmd__check_commands] )) ||
_devloop__subcmd__check_commands() {
    local commands; commands=()
    _describe -t commands 'devloop check commands' commands "$@"
}
(( $+functions[_devloop__subcmd__completions_commands] )) ||
_devloop__subcmd__completions_commands() {
    local commands; commands=()
    _describe -t commands 'devloop completions commands' commands "$@"
}
(( $+functions[_devloop__subcmd__doctor_commands] )) ||
_devloop__subcmd__doctor_commands() {
    local commands; commands=()
    _describe -t commands 'devloop doctor commands' commands "$@"
}
(( $+functions[_devloop__subcmd__down_commands] )) ||
_devloop__subcmd__down_commands() {
    local commands; commands=()
    _describe -t commands 'devloop down commands' commands "$@"
}
(( $+functions[_devloop__subcmd__env_commands] )) ||
_devloop__subcmd__env_commands() {
    local commands; commands=()
    _describe -t commands 'devloop env commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help_commands] )) ||
_devloop__subcmd__help_commands() {
    local commands; commands=(
'watch:Sync, then follow every change until Ctrl-C (the main job)' \
'sync:Sync once and exit; the exit code says whether the target is in sync' \
'check:Check devloop.yaml and print what it resolves to' \
'doctor:Check that each target can be used\: agent binaries, cluster access, the RBAC verbs devloop needs (printing the minimal Role if any is missing)' \
'intercept:Route the calls that reach a service to a process on this machine, with no sync, until Ctrl-C (then they go back to the app)' \
'env:Print the target container'\''s environment (the first ready pod'\''s)' \
'run:Run a command here with the target container'\''s environment; the cluster Services it names are reached through the agent, at local addresses put in their place' \
'status:What the running \`devloop watch\` (on this devloop.yaml) is doing (--json\: its whole state)' \
'trigger:Ask the running \`devloop watch\` to act on a service\: \`resync\`, \`restart\`, \`run N\` (its Nth on_sync command, or one whose command contains N), \`intercept on|off\`' \
'completions:Print shell completions (bash, zsh, fish, elvish, powershell)' \
'down:Remove what devloop put into targets (agents injected into pods). Safe to run twice, and after a crash' \
'help:Print this message or the help of the given subcommand(s)' \
    )
    _describe -t commands 'devloop help commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__check_commands] )) ||
_devloop__subcmd__help__subcmd__check_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help check commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__completions_commands] )) ||
_devloop__subcmd__help__subcmd__completions_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help completions commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__doctor_commands] )) ||
_devloop__subcmd__help__subcmd__doctor_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help doctor commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__down_commands] )) ||
_devloop__subcmd__help__subcmd__down_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help down commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__env_commands] )) ||
_devloop__subcmd__help__subcmd__env_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help env commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__help_commands] )) ||
_devloop__subcmd__help__subcmd__help_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help help commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__intercept_commands] )) ||
_devloop__subcmd__help__subcmd__intercept_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help intercept commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__run_commands] )) ||
_devloop__subcmd__help__subcmd__run_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help run commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__status_commands] )) ||
_devloop__subcmd__help__subcmd__status_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help status commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__sync_commands] )) ||
_devloop__subcmd__help__subcmd__sync_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help sync commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__trigger_commands] )) ||
_devloop__subcmd__help__subcmd__trigger_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help trigger commands' commands "$@"
}
(( $+functions[_devloop__subcmd__help__subcmd__watch_commands] )) ||
_devloop__subcmd__help__subcmd__watch_commands() {
    local commands; commands=()
    _describe -t commands 'devloop help watch commands' commands "$@"
}
(( $+functions[_devloop__subcmd__intercept_commands] )) ||
_devloop__subcmd__intercept_commands() {
    local commands; commands=()
    _describe -t commands 'devloop intercept commands' commands "$@"
}
(( $+functions[_devloop__subcmd__run_commands] )) ||
_devloop__subcmd__run_commands() {
    local commands; commands=()
    _describe -t commands 'devloop run commands' commands "$@"
}
(( $+functions[_devloop__subcmd__status_commands] )) ||
_devloop__subcmd__status_commands() {
    local commands; commands=()
    _describe -t commands 'devloop status commands' commands "$@"
}
(( $+functions[_devloop__subcmd__sync_commands] )) ||
_devloop__subcmd__sync_commands() {
    local commands; commands=()
    _describe -t commands 'devloop sync commands' commands "$@"
}
(( $+functions[_devloop__subcmd__trigger_commands] )) ||
_devloop__subcmd__trigger_commands() {
    local commands; commands=()
    _describe -t commands 'devloop trigger commands' commands "$@"
}
(( $+functions[_devloop__subcmd__watch_commands] )) ||
_devloop__subcmd__watch_commands() {
    local commands; commands=()
    _describe -t commands 'devloop watch commands' commands "$@"
}

if [ "$funcstack[1]" = "_devloop" ]; then
    _devloop "$@"
else
    compdef _devloop devloop
fi
