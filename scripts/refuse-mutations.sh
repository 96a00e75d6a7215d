# scripts/refuse-mutations.sh - sourced by the check-*.sh scripts: proves
# that their check refuses broken copies of what it checks.
#
#   refuse_mutations DIR LABEL "file|sed program|what the refusal must say"...
#
# For each entry, DIR is copied to $work/tree, the sed program applied to
# the file, and the caller's `check $work/tree` (writing its messages to
# $work/out) must fail and say the expected text. Sets failed=1 on a
# broken copy that passes, is refused for another reason, or a program
# that changed nothing (a test that cannot fail).
refuse_mutations() {
    local dir=$1 label=$2 m file program expected
    shift 2
    for m in "$@"; do
        IFS='|' read -r file program expected <<<"$m"
        rm -rf "$work/tree"
        cp -r "$dir" "$work/tree"
        sed -i "$program" "$work/tree/$file"
        if cmp -s "$dir/$file" "$work/tree/$file"; then
            echo "negative test on $file: the sed program changed nothing"; failed=1
        elif check "$work/tree"; then
            echo "negative test on $file ($program): NOT refused"; failed=1
        elif ! grep -qF -- "$expected" "$work/out"; then
            echo "negative test on $file ($program): refused, but without \"$expected\":"
            sed 's/^/  /' "$work/out"; failed=1
        fi
    done
    [ "$failed" = 0 ] && echo "$label: $# broken copies refused"
    return 0
}
