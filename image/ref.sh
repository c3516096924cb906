# Sourced by image/build.sh and tilt/devtools/build.sh (not part of the base layer's cache key,
# unlike lib.sh). Sourced, not run.

# normalize_ref REF: REF (name:tag) in the fully qualified form a kubelet resolves it to, as
# containerd must name the image for a pod's `image: REF` to find it without a pull:
# dkv:1 -> docker.io/library/dkv:1, me/dkv:1 -> docker.io/me/dkv:1, localhost:5000/dkv:1 stays.
# Fails (status 1, a line on stderr) without a tag, with a digest, or on a malformed name.
normalize_ref() {
    local ref=$1 name tag first
    if [[ $ref == *@* || ${ref##*/} != *:* ]]; then
        echo "not a name:tag reference: '$ref'" >&2
        return 1
    fi
    name=${ref%:*} tag=${ref##*:}
    first=${name%%/*}
    if [[ $name != */* ]]; then
        name=docker.io/library/$name
    elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
        name=docker.io/$name
    elif [[ $first == docker.io && ${name#*/} != */* ]]; then
        name=docker.io/library/${name#*/}
    fi
    local component='[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*'
    if [[ ! ${name#*/} =~ ^$component(/$component)*$ || ! $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]]; then
        echo "not a valid image reference: '$ref'" >&2
        return 1
    fi
    echo "$name:$tag"
}
