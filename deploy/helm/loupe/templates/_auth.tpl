{{/*
Who may call the gateway (values: auth). In keys mode the gateway reads its API keys file
(services/gateway/api_keys.py: one JSON line per key, hashes only) from a Secret mounted as a
directory at loupe.apiKeysDir. Never with subPath: the kubelet updates a Secret volume by
swapping a symlink in that directory, which a subPath mount never sees, and the gateway's
re-reads (LOUPE_AUTH_RELOAD_SECONDS) are what rotate keys without a restart. The Secret is
auth.existingSecret, or one the chart renders from auth.keys (apikeys.yaml). The index Job gets
a key of its own as LOUPE_API_KEY (indexJob.apiKey), and so do the migration's Jobs
(migration.apiKey, admin role). Health stays open: the probes and the helm
test pod need no key.
*/}}

{{- define "loupe.apiKeysDir" -}}
/etc/loupe/api-keys
{{- end }}

{{/* "true" when the gateway checks API keys (auth.mode keys). */}}
{{- define "loupe.authKeys" -}}
{{- if eq (toString .Values.auth.mode) "keys" }}true{{ end }}
{{- end }}

{{/* The Secret holding the keys file: auth.existingSecret, else the chart's own. */}}
{{- define "loupe.apiKeysSecretName" -}}
{{- default (include "loupe.componentName" (list . "gateway-api-keys")) .Values.auth.existingSecret }}
{{- end }}

{{/*
The gateway's LOUPE_AUTH* variables, as YAML. Set after every env map (loupe.serviceEnv), and
an env map that sets them is refused (loupe.validateAuth): open mode only from auth.mode, and
the keys file where the Secret is mounted.
*/}}
{{- define "loupe.authEnv" -}}
{{- if include "loupe.authKeys" . }}
LOUPE_AUTH: keys
LOUPE_API_KEYS_FILE: {{ printf "%s/%s" (include "loupe.apiKeysDir" .) .Values.auth.secretKey | quote }}
LOUPE_AUTH_RELOAD_SECONDS: {{ .Values.auth.reloadSeconds | toString | quote }}
{{- else }}
LOUPE_AUTH: open
{{- end }}
{{- end }}

{{/* The keys Secret as a volume of the gateway (keys mode): the keys file alone, as a directory. */}}
{{- define "loupe.apiKeysVolume" -}}
- name: api-keys
  secret:
    secretName: {{ include "loupe.apiKeysSecretName" . }}
    items:
      - key: {{ .Values.auth.secretKey }}
        path: {{ .Values.auth.secretKey }}
    # Readable by the pod's group (fsGroup), not by others.
    defaultMode: 0440
{{- end }}

{{/* No subPath (see above): the whole directory, so that the Secret's updates reach the file. */}}
{{- define "loupe.apiKeysMount" -}}
- name: api-keys
  mountPath: {{ include "loupe.apiKeysDir" . }}
  readOnly: true
{{- end }}

{{/*
The keys file of auth.keys: the entries as api_keys.py reads them (JSON objects, one a line;
burst a whole number, never 1e+06).
*/}}
{{- define "loupe.apiKeysFile" -}}
# Loupe API keys, from auth.keys of the Helm release: hashes only (services/gateway/api_keys.py).
{{- range .Values.auth.keys }}
{{- $entry := dict "name" .name "role" .role "sha256" .sha256 }}
{{- if and .rate (gt (float64 .rate) 0.0) }}
{{- $_ := set $entry "rate" (float64 .rate) }}
{{- end }}
{{- if .burst }}
{{- $_ := set $entry "burst" (int64 .burst) }}
{{- end }}
{{- with .created }}
{{- $_ := set $entry "created" (toString .) }}
{{- end }}
{{- with .description }}
{{- $_ := set $entry "description" (toString .) }}
{{- end }}
{{ toJson $entry }}
{{- end }}
{{ end }}

{{/*
What auth needs that a schema cannot check, and the schema's checks again for a helm that
skipped it. Called from loupe.validate.
*/}}
{{- define "loupe.validateAuth" -}}
{{- $auth := .Values.auth }}
{{- if not (has (toString $auth.mode) (list "keys" "open")) }}
{{- fail (printf "auth.mode=%q: expected keys (callers need an API key) or open (no authentication)" (toString $auth.mode)) }}
{{- end }}
{{- range $where, $env := dict "env" .Values.env "services.gateway.env" .Values.services.gateway.env }}
{{- range $variable := list "LOUPE_AUTH" "LOUPE_API_KEYS_FILE" "LOUPE_AUTH_RELOAD_SECONDS" }}
{{- if hasKey ($env | default dict) $variable }}
{{- fail (printf "%s.%s: the chart sets it from the auth values (auth.mode, auth.existingSecret or auth.keys, auth.reloadSeconds); set those instead" $where $variable) }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "loupe.authKeys" . }}
{{- $reload := float64 $auth.reloadSeconds }}
{{- if or (lt $reload 0.1) (gt $reload 3600.0) }}
{{- fail (printf "auth.reloadSeconds=%v: expected seconds from 0.1 to 3600 (LOUPE_AUTH_RELOAD_SECONDS)" $auth.reloadSeconds) }}
{{- end }}
{{- if and $auth.existingSecret $auth.keys }}
{{- fail "auth: set auth.existingSecret (a Secret you manage) or auth.keys (a Secret the chart renders), not both" }}
{{- end }}
{{- if not (or $auth.existingSecret $auth.keys) }}
{{- $file := ternary "api-keys.jsonl" (printf "%s=api-keys.jsonl" $auth.secretKey) (eq $auth.secretKey "api-keys.jsonl") }}
{{- fail (printf "auth.mode=keys (the default): the gateway takes calls with an API key only, and needs the Secret of its keys file. Make the file with `loupe keys create NAME --role ROLE --keys-file api-keys.jsonl`, put it in a Secret with `kubectl -n %s create secret generic loupe-api-keys --from-file=%s`, and set auth.existingSecret=loupe-api-keys (chart README, \"API keys\"); or list the keys' hashes in auth.keys; or set auth.mode=open to let anyone who reaches the gateway search, index and drop catalogues" .Release.Namespace $file) }}
{{- end }}
{{- $names := dict }}
{{- $digests := dict }}
{{- range $i, $key := $auth.keys }}
{{- $where := printf "auth.keys[%d]" $i }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$" (toString $key.name)) }}
{{- fail (printf "%s.name=%q: expected 1 to 64 letters, digits, '_', '.', '@' or '-'" $where (toString $key.name)) }}
{{- end }}
{{- if not (has (toString $key.role) (list "read" "write" "admin")) }}
{{- fail (printf "%s.role=%q: expected read, write or admin" $where (toString $key.role)) }}
{{- end }}
{{- if not (regexMatch "^[0-9a-f]{64}$" (toString $key.sha256)) }}
{{- fail (printf "%s.sha256: expected the key's SHA-256 as 64 lower-case hex digits (as `loupe keys create` writes it in the keys file), never the key itself" $where) }}
{{- end }}
{{- if and $key.burst (not (and $key.rate (gt (float64 $key.rate) 0.0))) }}
{{- fail (printf "%s: burst without a rate" $where) }}
{{- end }}
{{- if hasKey $names (toString $key.name) }}
{{- fail (printf "%s: a second key named %q" $where (toString $key.name)) }}
{{- end }}
{{- if hasKey $digests (toString $key.sha256) }}
{{- fail (printf "%s: the same sha256 as another key" $where) }}
{{- end }}
{{- $_ := set $names (toString $key.name) true }}
{{- $_ := set $digests (toString $key.sha256) true }}
{{- end }}
{{- if and .Values.migration.enabled (not .Values.migration.apiKey.existingSecret) }}
{{- fail (printf "migration.enabled=true with auth.mode=keys needs migration.apiKey.existingSecret: a Secret holding a key with the admin role (MigrateCatalog, ListItems) under migration.apiKey.key (%s). `loupe keys create reindex --role admin --keys-file api-keys.jsonl > reindex.key`, then `kubectl -n %s create secret generic loupe-reindex-api-key --from-file=%s=reindex.key` (and update the keys Secret); chart README, \"API keys\"" .Values.migration.apiKey.key .Release.Namespace .Values.migration.apiKey.key) }}
{{- end }}
{{- if and .Values.indexJob.enabled (not .Values.indexJob.apiKey.existingSecret) }}
{{- fail (printf "indexJob.enabled=true with auth.mode=keys needs indexJob.apiKey.existingSecret: a Secret holding a key with the write role under indexJob.apiKey.key (%s). `loupe keys create index-job --role write --keys-file api-keys.jsonl > index-job.key`, then `kubectl -n %s create secret generic loupe-index-api-key --from-file=%s=index-job.key` (and update the keys Secret); chart README, \"API keys\"" .Values.indexJob.apiKey.key .Release.Namespace .Values.indexJob.apiKey.key) }}
{{- end }}
{{- end }}
{{- end }}
