# Shared by the benchmark scripts (sourced, not run).

# Wait until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}

# One line of herdgate-load's Markdown summary: the value after `label`.
field() { grep -F "| $1 |" | head -1 | awk -F'|' '{gsub(/ /, "", $3); print $3}'; }

# A throwaway CA (DIR/ca.pem) and a certificate for localhost and 127.0.0.1
# (DIR/cert.pem, DIR/key.pem); KEY=rsa makes the leaf's key RSA-2048
# (default: ECDSA P-256).
bench_certs() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -keyout "$dir/ca.key" \
    -out "$dir/ca.pem" -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign 2>/dev/null
  local leafkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
  [ "${KEY:-ec}" = rsa ] && leafkey=(-newkey rsa:2048)
  openssl req "${leafkey[@]}" -nodes -keyout "$dir/key.pem" -out "$dir/leaf.csr" -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
    -out "$dir/cert.pem" -extfile "$dir/ext.cnf" 2>/dev/null
}
