{{/*
Names, labels and the values every template derives the same way.
*/}}

{{/*
The entries of .Values.services, in the order the templates render them: the five Loupe
services, and the retrieval writer, a second workload of the retrieval program.
*/}}
{{- define "loupe.serviceNames" -}}
gateway detection embedding retrieval retrievalWriter ranking
{{- end }}

{{/* The programs an entry can run (`loupe serve <program>`). */}}
{{- define "loupe.programNames" -}}
gateway detection embedding retrieval ranking
{{- end }}

{{/*
The entries rendered: all of them, except the retrieval writer with an embedded milvus-lite
(its one retrieval pod writes).
*/}}
{{- define "loupe.renderedServices" -}}
{{- $names := list }}
{{- range $name := splitList " " (include "loupe.serviceNames" .) }}
{{- if not (and (eq $name "retrievalWriter") $.Values.milvus.embedded) }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- join " " $names }}
{{- end }}

{{/*
The component of an entry: its key in kebab case (retrievalWriter: retrieval-writer). Object
names end with it and the app.kubernetes.io/component label is it.
Usage: include "loupe.serviceComponent" "retrievalWriter"
*/}}
{{- define "loupe.serviceComponent" -}}
{{- kebabcase . }}
{{- end }}

{{/*
The program an entry runs (`loupe serve <program>`, and its LOUPE_<PROGRAM>_* variables): its
`serve` field, else its key.
Usage: include "loupe.serviceProgram" (list $ "retrievalWriter")
*/}}
{{- define "loupe.serviceProgram" -}}
{{- $svc := index (index . 0).Values.services (index . 1) }}
{{- default (index . 1) $svc.serve }}
{{- end }}

{{/* "true" when the chart renders the retrieval writer (an external Milvus). */}}
{{- define "loupe.retrievalWriterRendered" -}}
{{- if not .Values.milvus.embedded }}true{{ end }}
{{- end }}

{{/*
host:port where the gateway sends retrieval's writes (LOUPE_RETRIEVAL_WRITER_ADDR): the writer's
Service, or with an embedded milvus-lite the retrieval Service (its one pod writes).
*/}}
{{- define "loupe.retrievalWriterAddress" -}}
{{- if include "loupe.retrievalWriterRendered" . }}
{{- printf "%s:%v" (include "loupe.componentName" (list . "retrieval-writer")) .Values.services.retrievalWriter.service.port }}
{{- else }}
{{- printf "%s:%v" (include "loupe.componentName" (list . "retrieval")) .Values.services.retrieval.service.port }}
{{- end }}
{{- end }}

{{/* The services that load a model (they mount the model repository). */}}
{{- define "loupe.modelServiceNames" -}}
detection embedding
{{- end }}

{{- define "loupe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name. Component names append "-<component>" (at most 11 more
characters, except "-retrieval-writer"), so the prefix is kept to 52; where a component name
would still pass 63 characters, loupe.componentName shortens the prefix, never the component
(so that "-retrieval-writer" never becomes "-retrieval", the readers' name).
*/}}
{{- define "loupe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Usage: include "loupe.componentName" (list $ "gateway") */}}
{{- define "loupe.componentName" -}}
{{- $component := index . 1 }}
{{- $prefix := include "loupe.fullname" (index . 0) | trunc (int (sub 62 (len $component))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $component }}
{{- end }}

{{- define "loupe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. Usage: include "loupe.labels" (list $ "gateway"); "" for none. */}}
{{- define "loupe.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "loupe.chart" $root }}
{{ include "loupe.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: loupe
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select a component's pods. Usage: include "loupe.selectorLabels" (list $ "gateway") */}}
{{- define "loupe.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "loupe.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
{{- if index . 1 }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount of one workload: the one the chart creates for it ("<fullname>-<component>"
unless its serviceAccount.name says otherwise), or the existing one its serviceAccount.name
names (else the namespace's "default") when the chart creates none for it.
Usage: include "loupe.serviceAccountName" (list $ "gateway" .Values.services.gateway.serviceAccount)
*/}}
{{- define "loupe.serviceAccountName" -}}
{{- $root := index . 0 }}
{{- $sa := index . 2 }}
{{- if and $root.Values.serviceAccount.create $sa.create }}
{{- default (include "loupe.componentName" (list $root (index . 1))) $sa.name }}
{{- else }}
{{- default "default" $sa.name }}
{{- end }}
{{- end }}

{{/*
Every workload the release renders with its ServiceAccount values, as YAML
{accounts: [{component, serviceAccount}]}: one per rendered service entry, Triton, the index
Job, the migration's Jobs (one account for all of them) and the helm test pod (which has no values of its own: always its own account).
Usage: (include "loupe.workloadServiceAccounts" . | fromYaml).accounts
*/}}
{{- define "loupe.workloadServiceAccounts" -}}
{{- $accounts := list }}
{{- range $name := splitList " " (include "loupe.renderedServices" .) }}
{{- $accounts = append $accounts (dict "component" (include "loupe.serviceComponent" $name) "serviceAccount" (index $.Values.services $name).serviceAccount) }}
{{- end }}
{{- if include "loupe.tritonRendered" . }}
{{- $accounts = append $accounts (dict "component" "triton" "serviceAccount" .Values.triton.serviceAccount) }}
{{- end }}
{{- if .Values.indexJob.enabled }}
{{- $accounts = append $accounts (dict "component" "index-job" "serviceAccount" .Values.indexJob.serviceAccount) }}
{{- end }}
{{- if .Values.migration.enabled }}
{{- $accounts = append $accounts (dict "component" "reindex" "serviceAccount" .Values.migration.serviceAccount) }}
{{- end }}
{{- if .Values.tests.enabled }}
{{- $accounts = append $accounts (dict "component" "test" "serviceAccount" (dict "create" true "name" "" "annotations" (dict))) }}
{{- end }}
{{- toYaml (dict "accounts" $accounts) }}
{{- end }}

{{/*
The startup probe fields of one service entry: its own startupProbe over probes.startup.
Usage: include "loupe.startupProbe" (list $ "gateway") | fromYaml
*/}}
{{- define "loupe.startupProbe" -}}
{{- $root := index . 0 }}
{{- $svc := index $root.Values.services (index . 1) }}
{{- toYaml (merge (dict) (deepCopy ($svc.startupProbe | default dict)) (deepCopy $root.Values.probes.startup)) }}
{{- end }}

{{/* "true" when the cluster serves the Prometheus Operator's API (its CRDs are installed). */}}
{{- define "loupe.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "loupe.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion ($image.tag | toString)) }}
{{- end }}
{{- end }}

{{/* host:port of the release's gateway Service (its gRPC port), as in-cluster clients dial it. */}}
{{- define "loupe.gatewayAddress" -}}
{{- printf "%s:%v" (include "loupe.componentName" (list . "gateway")) .Values.services.gateway.service.port }}
{{- end }}

{{/*
Name of the index Job: "<fullname>-index-job", plus "-<indexJob.runId>" when set, so that a new
runId is a new Job (a Job's pod template cannot be changed in place).
*/}}
{{- define "loupe.indexJobName" -}}
{{- $name := include "loupe.componentName" (list . "index-job") }}
{{- with .Values.indexJob.runId | default "" | toString }}
{{- $name = printf "%s-%s" $name . }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
Name of a migration Job: "<fullname>-reindex", plus "-<migration.runId>" when set, plus
"-<step>" (switch, rollback, drop-previous, abort; "" for the shard Job).
Usage: include "loupe.migrationJobName" (list $ "switch")
*/}}
{{- define "loupe.migrationJobName" -}}
{{- $root := index . 0 }}
{{- $name := include "loupe.componentName" (list $root "reindex") }}
{{- with $root.Values.migration.runId | default "" | toString }}
{{- $name = printf "%s-%s" $name . }}
{{- end }}
{{- with index . 1 }}
{{- $name = printf "%s-%s" $name . }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
A model reference NAME[:VERSION] (models.*, migration.model) as YAML {name, version}; version
"" when none is given (the newest in the repository).
*/}}
{{- define "loupe.modelRef" -}}
{{- $parts := splitn ":" 2 (toString .) }}
name: {{ $parts._0 | quote }}
version: {{ default "" $parts._1 | quote }}
{{- end }}

{{/*
The embedders the embedding service serves, as YAML {models: [NAME[:VERSION], ...]}: the
default (models.embedder) first, then models.extraEmbedders.
*/}}
{{- define "loupe.servedEmbedders" -}}
{{- toYaml (dict "models" (prepend (.Values.models.extraEmbedders | default list) .Values.models.embedder)) }}
{{- end }}

{{- define "loupe.secretName" -}}
{{- default (include "loupe.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* "true" when the chart renders its own Triton. */}}
{{- define "loupe.tritonRendered" -}}
{{- if and (eq .Values.inference.backend "triton") (not .Values.triton.externalUrl) }}true{{ end }}
{{- end }}

{{- define "loupe.tritonUrl" -}}
{{- if .Values.triton.externalUrl }}
{{- .Values.triton.externalUrl }}
{{- else }}
{{- include "loupe.dialledAddress" (list . "triton" .Values.triton.grpcPort) }}
{{- end }}
{{- end }}

{{/* "true" when retrieval runs milvus-lite in its pod (single writer). */}}
{{- define "loupe.embeddedMilvus" -}}
{{- if .Values.milvus.embedded }}true{{ end }}
{{- end }}

{{/*
The environment of one entry of .Values.services, as a dict, in increasing precedence: what the
chart derives (backend addresses, stores, inference backend), the chart-wide env, the env of
the service whose program the entry runs (the retrieval writer starts from the readers' env,
so that both see the same store settings), the entry's own env, and last what must agree with
the pod spec and the release's topology (listen host, ports, mount paths, retrieval role).
Usage: include "loupe.serviceEnv" (list $ "gateway") | fromYaml
*/}}
{{- define "loupe.serviceEnv" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $svc := index $root.Values.services $name }}
{{- $program := include "loupe.serviceProgram" . }}
{{- $upper := upper $program }}
{{- $env := dict }}
{{- /* Off unless grpcReflection (or an env below) turns it on. */}}
{{- $_ := set $env "LOUPE_GRPC_REFLECTION" (ternary "true" "false" (eq (toString $root.Values.grpcReflection) "true")) }}
{{- if $root.Values.tls.enabled }}
{{- /* The backends require a client certificate; the gateway's callers bring API keys. */}}
{{- $_ := set $env "LOUPE_TLS_CLIENT_AUTH" (ternary "none" "require" (eq $program "gateway")) }}
{{- end }}
{{- if eq $program "gateway" }}
{{- range $backend := list "detection" "embedding" "retrieval" "ranking" }}
{{- $port := (index $root.Values.services $backend).service.port }}
{{- $_ := set $env (printf "LOUPE_%s_ADDR" (upper $backend)) (include "loupe.dialledAddress" (list $root $backend $port)) }}
{{- end }}
{{- /* Reads go to the readers (LOUPE_RETRIEVAL_ADDR), writes to the one writer. */}}
{{- $_ := set $env "LOUPE_RETRIEVAL_WRITER_ADDR" (include "loupe.retrievalWriterAddress" $root) }}
{{- end }}
{{- if has $program (list "gateway" "retrieval") }}
{{- /* The gateway caches in Redis; retrieval bumps a catalogue's cache generation on writes. */}}
{{- $_ := set $env "LOUPE_REDIS_URL" ($root.Values.redis.url | toString) }}
{{- $_ := set $env "LOUPE_REDIS_TIMEOUT_SECONDS" ($root.Values.redis.timeoutSeconds | toString) }}
{{- end }}
{{- if eq $program "detection" }}
{{- $ref := include "loupe.modelRef" $root.Values.models.detector | fromYaml }}
{{- $_ := set $env "LOUPE_DETECTION_MODEL" $ref.name }}
{{- $_ := set $env "LOUPE_DETECTION_MODEL_VERSION" $ref.version }}
{{- end }}
{{- if eq $program "embedding" }}
{{- /* The default embedder, and every other one served beside it (a migration's models). */}}
{{- $ref := include "loupe.modelRef" $root.Values.models.embedder | fromYaml }}
{{- $_ := set $env "LOUPE_EMBEDDING_MODEL" $ref.name }}
{{- $_ := set $env "LOUPE_EMBEDDING_MODEL_VERSION" $ref.version }}
{{- $_ := set $env "LOUPE_EMBEDDING_EXTRA_MODELS" (join "," ($root.Values.models.extraEmbedders | default list)) }}
{{- end }}
{{- if and (eq $program "gateway") (ne $root.Values.originals.keep "request") (not $root.Values.originals.uri) }}
{{- fail (printf "originals.keep=%s keeps image bytes in the originals store: set originals.uri (s3://bucket/prefix), or originals.keep=request" $root.Values.originals.keep) }}
{{- end }}
{{- if and (eq $program "gateway") $root.Values.originals.uri }}
{{- $_ := set $env "LOUPE_ORIGINALS_URI" $root.Values.originals.uri }}
{{- $_ := set $env "LOUPE_ORIGINALS_KEEP" $root.Values.originals.keep }}
{{- end }}
{{- if has $program (splitList " " (include "loupe.modelServiceNames" $root)) }}
{{- $_ := set $env "LOUPE_INFERENCE_BACKEND" $root.Values.inference.backend }}
{{- if eq $root.Values.inference.backend "triton" }}
{{- $_ := set $env "LOUPE_TRITON_URL" (include "loupe.tritonUrl" $root) }}
{{- $_ := set $env "LOUPE_TRITON_TIMEOUT_SECONDS" ($root.Values.triton.clientTimeoutSeconds | toString) }}
{{- end }}
{{- end }}
{{- if eq $program "retrieval" }}
{{- if not $root.Values.milvus.embedded }}
{{- $_ := set $env "LOUPE_MILVUS_URI" $root.Values.milvus.uri }}
{{- end }}
{{- with $root.Values.milvus.dbName }}
{{- $_ := set $env "LOUPE_MILVUS_DB_NAME" . }}
{{- end }}
{{- $_ := set $env "LOUPE_MILVUS_COLLECTION_PREFIX" $root.Values.milvus.collectionPrefix }}
{{- end }}
{{- range $key, $value := $root.Values.env }}
{{- $_ := set $env $key ($value | toString) }}
{{- end }}
{{- if ne $program $name }}
{{- range $key, $value := (index $root.Values.services $program).env }}
{{- $_ := set $env $key ($value | toString) }}
{{- end }}
{{- end }}
{{- range $key, $value := $svc.env }}
{{- $_ := set $env $key ($value | toString) }}
{{- end }}
{{- $_ := set $env "LOUPE_LISTEN_HOST" "0.0.0.0" }}
{{- if eq $program "gateway" }}
{{- /* Open mode from auth.mode only; the keys file where its Secret is mounted. */}}
{{- range $key, $value := include "loupe.authEnv" $root | fromYaml }}
{{- $_ := set $env $key $value }}
{{- end }}
{{- end }}
{{- if $root.Values.tls.enabled }}
{{- range $key, $value := include "loupe.tlsEnv" $root | fromYaml }}
{{- $_ := set $env $key $value }}
{{- end }}
{{- end }}
{{- $_ := set $env (printf "LOUPE_%s_PORT" $upper) ($svc.grpcPort | toString) }}
{{- $_ := set $env (printf "LOUPE_%s_METRICS_PORT" $upper) ($svc.metricsPort | toString) }}
{{- if has $program (splitList " " (include "loupe.modelServiceNames" $root)) }}
{{- $_ := set $env "LOUPE_MODEL_REPOSITORY" $root.Values.modelRepository.mountPath }}
{{- end }}
{{- if eq $program "retrieval" }}
{{- /*
One writer (role all) takes every write and runs the batch jobs; the readers only search. With
an embedded milvus-lite the one retrieval pod does both.
*/}}
{{- $writes := or (eq $name "retrievalWriter") $root.Values.milvus.embedded }}
{{- $_ := set $env "LOUPE_RETRIEVAL_ROLE" (ternary "all" "reader" $writes) }}
{{- end }}
{{- if and (eq $name "retrieval") $root.Values.milvus.embedded }}
{{- $_ := set $env "LOUPE_DATA_DIR" "/data" }}
{{- end }}
{{- toYaml $env }}
{{- end }}

{{/*
Topology spread constraints with each constraint's labelSelector filled in: without one a
constraint counts no pods and spreads nothing.
Usage: include "loupe.topologySpread" (list $ "gateway" $constraints)
*/}}
{{- define "loupe.topologySpread" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $out := list }}
{{- range $constraint := index . 2 }}
{{- $c := deepCopy $constraint }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "loupe.selectorLabels" (list $root $component) | fromYaml)) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Volumes and init container that put the model repository at modelRepository.mountPath. */}}
{{- define "loupe.modelRepositoryVolume" -}}
- name: model-repository
{{- if eq .Values.modelRepository.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelRepository.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelRepository.image.sizeLimit }}
{{- end }}
{{- end }}

{{- define "loupe.modelRepositoryMount" -}}
- name: model-repository
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
{{- if and (eq .Values.modelRepository.source "pvc") .Values.modelRepository.pvc.subPath }}
  subPath: {{ .Values.modelRepository.pvc.subPath }}
{{- end }}
{{- end }}

{{- define "loupe.modelRepositoryInit" -}}
{{- if eq .Values.modelRepository.source "image" }}
- name: copy-models
  image: {{ include "loupe.imageRef" (list .Values.modelRepository.image .) }}
  imagePullPolicy: {{ .Values.modelRepository.image.pullPolicy }}
  # The models image holds the repository at /models; the pod reads a copy, so the
  # repository is exactly the image's (versioned by its tag) and read-only where it is used.
  command: ["cp", "-R", "/models/.", "/model-repository/"]
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.modelRepository.image.resources | nindent 4 }}
  volumeMounts:
    - name: model-repository
      mountPath: /model-repository
{{- end }}
{{- end }}

{{/*
Refuse values that would render a broken or unsafe release, naming what to change. Helm checks
values.schema.json first (types, enums, ranges, unknown keys, the one retrieval writer); these
are the checks a schema cannot express, and the writer's again, for a helm that skipped it.
*/}}
{{- define "loupe.validate" -}}
{{- $known := splitList " " (include "loupe.serviceNames" .) }}
{{- $programs := splitList " " (include "loupe.programNames" .) }}
{{- range $name, $_ := .Values.services }}
{{- if not (has $name $known) }}
{{- fail (printf "services.%s: unknown service; expected one of %s" $name (join ", " $known)) }}
{{- end }}
{{- end }}
{{- range $name := $known }}
{{- if not (hasKey $.Values.services $name) }}
{{- fail (printf "services.%s: missing; every Loupe service must be configured" $name) }}
{{- end }}
{{- $program := include "loupe.serviceProgram" (list $ $name) }}
{{- if not (has $program $programs) }}
{{- fail (printf "services.%s.serve=%q: expected one of %s" $name $program (join ", " $programs)) }}
{{- end }}
{{- end }}
{{- if ne (include "loupe.serviceProgram" (list . "retrievalWriter")) "retrieval" }}
{{- fail "services.retrievalWriter.serve: the retrieval writer runs retrieval (serve: retrieval)" }}
{{- end }}
{{- if include "loupe.retrievalWriterRendered" . }}
{{- $writer := .Values.services.retrievalWriter }}
{{- $strategy := $writer.strategy | default dict }}
{{- if or $writer.autoscaling.enabled (ne (int $writer.replicas) 1) (ne ($strategy.type | default "") "Recreate") }}
{{- fail "services.retrievalWriter: two writers must never run at once, so the writer needs replicas: 1, autoscaling.enabled: false and strategy.type: Recreate (scale services.retrieval, the readers, instead)" }}
{{- end }}
{{- end }}
{{- if not (has .Values.inference.backend (list "onnxruntime" "triton")) }}
{{- fail (printf "inference.backend=%q: expected onnxruntime or triton" .Values.inference.backend) }}
{{- end }}
{{- if not (has .Values.modelRepository.source (list "image" "pvc")) }}
{{- fail (printf "modelRepository.source=%q: expected image or pvc" .Values.modelRepository.source) }}
{{- end }}
{{- if and (eq .Values.modelRepository.source "pvc") (not .Values.modelRepository.pvc.claimName) }}
{{- fail "modelRepository.source=pvc needs modelRepository.pvc.claimName" }}
{{- end }}
{{- if .Values.milvus.embedded }}
{{- $retrieval := .Values.services.retrieval }}
{{- if or $retrieval.autoscaling.enabled (gt (int $retrieval.replicas) 1) }}
{{- fail "milvus.embedded=true: milvus-lite is a single writer, so services.retrieval needs replicas: 1 and autoscaling.enabled: false" }}
{{- end }}
{{- else if not .Values.milvus.uri }}
{{- fail "milvus.uri is empty: give the Milvus server URI, or set milvus.embedded=true (development only)" }}
{{- end }}
{{- /*
Disruption budgets: one of minAvailable and maxUnavailable, and a minAvailable count below the
fewest replicas the workload runs, or a drain could never evict any of its pods.
*/}}
{{- $budgets := dict }}
{{- range $name := splitList " " (include "loupe.renderedServices" .) }}
{{- $_ := set $budgets (printf "services.%s" $name) (index $.Values.services $name) }}
{{- end }}
{{- if include "loupe.tritonRendered" . }}
{{- $_ := set $budgets "triton" .Values.triton }}
{{- end }}
{{- range $path, $w := $budgets }}
{{- $pdb := $w.pdb }}
{{- if $pdb.enabled }}
{{- $min := $pdb.minAvailable }}
{{- if and (not (kindIs "invalid" $min)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail (printf "%s.pdb: set minAvailable or maxUnavailable, not both (set the other to null)" $path) }}
{{- end }}
{{- if and (kindIs "invalid" $min) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail (printf "%s.pdb: set minAvailable or maxUnavailable" $path) }}
{{- end }}
{{- $fewest := ternary $w.autoscaling.minReplicas $w.replicas (and $w.autoscaling.enabled true) }}
{{- if and (not (kindIs "invalid" $min)) (not (kindIs "string" $min)) (ge (int $min) (int $fewest)) }}
{{- fail (printf "%s.pdb.minAvailable=%v with %v replicas at the fewest: a node drain could never evict one of them; run more replicas or use maxUnavailable" $path $min $fewest) }}
{{- end }}
{{- end }}
{{- end }}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" (.Values.redis.url | toString) }}
{{- fail "redis.url holds a password: remove it from the URL and give it as secrets.redisPassword, or in secrets.existingSecret (key secrets.redisPasswordKey)" }}
{{- end }}
{{- if and .Values.secrets.existingSecret (or .Values.secrets.redisPassword .Values.secrets.milvusToken) }}
{{- fail "secrets.existingSecret is set: put the Redis password and Milvus token in that Secret, not in secrets.redisPassword / secrets.milvusToken" }}
{{- end }}
{{- if .Values.indexJob.enabled }}
{{- $job := .Values.indexJob }}
{{- if not $job.manifest }}
{{- fail "indexJob.enabled=true needs indexJob.manifest: the URI of the CSV or Parquet manifest (s3://, gs://, https:// or a path in the image)" }}
{{- end }}
{{- /* Kubernetes caps an Indexed Job with per-index retries at 100000 completions. */}}
{{- if or (lt (int64 $job.shards) 1) (gt (int64 $job.shards) 100000) }}
{{- fail (printf "indexJob.shards=%v: expected 1 to 100000 shards" $job.shards) }}
{{- end }}
{{- if lt (int64 $job.parallelism) 1 }}
{{- fail (printf "indexJob.parallelism=%v: expected at least 1 (set indexJob.suspend=true to pause)" $job.parallelism) }}
{{- end }}
{{- range $key := list "backoffLimitPerIndex" "maxFailedIndexes" "backoffLimit" }}
{{- if lt (int64 (index $job $key)) 0 }}
{{- fail (printf "indexJob.%s=%v: expected 0 or more" $key (index $job $key)) }}
{{- end }}
{{- end }}
{{- $runId := $job.runId | default "" | toString }}
{{- if and $runId (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $runId)) }}
{{- fail (printf "indexJob.runId=%q: use lower-case letters, digits and '-' (it ends the Job's name)" $runId) }}
{{- end }}
{{- $name := include "loupe.indexJobName" . }}
{{- if gt (len $name) 63 }}
{{- fail (printf "indexJob: the Job name %q is longer than 63 characters; shorten indexJob.runId (or fullnameOverride)" $name) }}
{{- end }}
{{- end }}
{{- include "loupe.validateModels" . }}
{{- include "loupe.validateMigration" . }}
{{- include "loupe.validateAuth" . }}
{{- end }}

{{/*
The models come from models.* only: an env map that names them would disagree with what
Triton loads, what the migration checks and what the alerts compare.
*/}}
{{- define "loupe.validateModels" -}}
{{- $owned := list "LOUPE_DETECTION_MODEL" "LOUPE_DETECTION_MODEL_VERSION" "LOUPE_EMBEDDING_MODEL" "LOUPE_EMBEDDING_MODEL_VERSION" "LOUPE_EMBEDDING_EXTRA_MODELS" }}
{{- $maps := dict "env" .Values.env }}
{{- range $name, $svc := .Values.services }}
{{- $_ := set $maps (printf "services.%s.env" $name) ($svc.env | default dict) }}
{{- end }}
{{- range $where, $map := $maps }}
{{- range $key := $owned }}
{{- if hasKey $map $key }}
{{- fail (printf "%s.%s: set the models with models.detector, models.embedder and models.extraEmbedders (NAME[:VERSION]), not in env" $where $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $model := (include "loupe.servedEmbedders" . | fromYaml).models }}
{{- $name := (include "loupe.modelRef" $model | fromYaml).name }}
{{- if hasKey $seen $name }}
{{- fail (printf "models.extraEmbedders: %q is served twice (models.embedder and models.extraEmbedders name each embedder once; two versions of one model need two names)" $name) }}
{{- end }}
{{- $_ := set $seen $name true }}
{{- end }}
{{- end }}

{{- define "loupe.validateMigration" -}}
{{- if .Values.migration.enabled }}
{{- $m := .Values.migration }}
{{- if not $m.catalog }}
{{- fail "migration.enabled=true needs migration.catalog: the catalogue to re-index (`loupe catalogs list` shows each one's embedder)" }}
{{- end }}
{{- if or (not (regexMatch "^[a-z0-9][a-z0-9_]{0,63}$" (toString $m.catalog))) (contains "__" (toString $m.catalog)) }}
{{- fail (printf "migration.catalog=%q: a catalogue name is 1 to 64 lower-case letters, digits and underscores, starting with a letter or digit, with no two underscores in a row" (toString $m.catalog)) }}
{{- end }}
{{- if not (has $m.action (list "reindex" "rollback" "drop-previous" "abort")) }}
{{- fail (printf "migration.action=%q: expected reindex, rollback, drop-previous or abort" (toString $m.action)) }}
{{- end }}
{{- if eq $m.action "reindex" }}
{{- if not $m.model }}
{{- fail "migration.enabled=true needs migration.model: the embedder to re-index with, NAME[:VERSION], served by the embedding service (models.extraEmbedders)" }}
{{- end }}
{{- $want := include "loupe.modelRef" $m.model | fromYaml }}
{{- $served := false }}
{{- range $model := (include "loupe.servedEmbedders" . | fromYaml).models }}
{{- $ref := include "loupe.modelRef" $model | fromYaml }}
{{- if and (eq $ref.name $want.name) (or (not $want.version) (eq $ref.version $want.version)) }}
{{- $served = true }}
{{- end }}
{{- end }}
{{- if not $served }}
{{- fail (printf "migration.model=%q is not served: add it to models.extraEmbedders (served: %s), roll that out, then start the migration" (toString $m.model) (join ", " (include "loupe.servedEmbedders" . | fromYaml).models)) }}
{{- end }}
{{- if or (lt (int64 $m.shards) 1) (gt (int64 $m.shards) 100000) }}
{{- fail (printf "migration.shards=%v: expected 1 to 100000 shards" $m.shards) }}
{{- end }}
{{- if lt (int64 $m.parallelism) 1 }}
{{- fail (printf "migration.parallelism=%v: expected at least 1 (set migration.suspend=true to pause)" $m.parallelism) }}
{{- end }}
{{- end }}
{{- range $key := list "backoffLimitPerIndex" "maxFailedIndexes" "backoffLimit" "switchBackoffLimit" }}
{{- if lt (int64 (index $m $key)) 0 }}
{{- fail (printf "migration.%s=%v: expected 0 or more" $key (index $m $key)) }}
{{- end }}
{{- end }}
{{- $runId := $m.runId | default "" | toString }}
{{- if and $runId (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $runId)) }}
{{- fail (printf "migration.runId=%q: use lower-case letters, digits and '-' (it ends the Jobs' names)" $runId) }}
{{- end }}
{{- /* The longest name a step gets: "-drop-previous". */}}
{{- $name := include "loupe.migrationJobName" (list . "drop-previous") }}
{{- if gt (len $name) 63 }}
{{- fail (printf "migration: the Job name %q is longer than 63 characters; shorten migration.runId (or fullnameOverride)" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The chart's own Secret (when no existingSecret is named). */}}
{{- define "loupe.secret" -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "loupe.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list . "") | nindent 4 }}
type: Opaque
data:
  {{ .Values.secrets.redisPasswordKey }}: {{ .Values.secrets.redisPassword | toString | b64enc | quote }}
  {{ .Values.secrets.milvusTokenKey }}: {{ .Values.secrets.milvusToken | toString | b64enc | quote }}
{{- end }}
