{{/*
Names, labels and the values every template derives the same way.
*/}}

{{/* The five Loupe services, in the order the templates render them. */}}
{{- define "loupe.serviceNames" -}}
gateway detection embedding retrieval ranking
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
characters), so the prefix is kept to 52.
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
{{- printf "%s-%s" (include "loupe.fullname" (index . 0)) (index . 1) }}
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

{{- define "loupe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loupe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
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

{{/* The index Job's ServiceAccount: its own when indexJob.serviceAccount says so, else the release's. */}}
{{- define "loupe.indexJobServiceAccountName" -}}
{{- $sa := .Values.indexJob.serviceAccount }}
{{- if $sa.create }}
{{- default (include "loupe.componentName" (list . "index-job")) $sa.name }}
{{- else }}
{{- default (include "loupe.serviceAccountName" .) $sa.name }}
{{- end }}
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
{{- printf "%s:%v" (include "loupe.componentName" (list . "triton")) .Values.triton.grpcPort }}
{{- end }}
{{- end }}

{{/* "true" when retrieval runs milvus-lite in its pod (single writer). */}}
{{- define "loupe.embeddedMilvus" -}}
{{- if .Values.milvus.embedded }}true{{ end }}
{{- end }}

{{/*
The environment of one service, as a dict, in increasing precedence: what the chart derives
(backend addresses, stores, inference backend), the chart-wide env, the service's own env, and
last what must agree with the pod spec (listen host, ports, mount paths).
Usage: include "loupe.serviceEnv" (list $ "gateway") | fromYaml
*/}}
{{- define "loupe.serviceEnv" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $svc := index $root.Values.services $name }}
{{- $upper := upper $name }}
{{- $env := dict }}
{{- if eq $name "gateway" }}
{{- range $backend := list "detection" "embedding" "retrieval" "ranking" }}
{{- $port := (index $root.Values.services $backend).service.port }}
{{- $_ := set $env (printf "LOUPE_%s_ADDR" (upper $backend)) (printf "%s:%v" (include "loupe.componentName" (list $root $backend)) $port) }}
{{- end }}
{{- $_ := set $env "LOUPE_REDIS_URL" ($root.Values.redis.url | toString) }}
{{- end }}
{{- if has $name (splitList " " (include "loupe.modelServiceNames" $root)) }}
{{- $_ := set $env "LOUPE_INFERENCE_BACKEND" $root.Values.inference.backend }}
{{- if eq $root.Values.inference.backend "triton" }}
{{- $_ := set $env "LOUPE_TRITON_URL" (include "loupe.tritonUrl" $root) }}
{{- $_ := set $env "LOUPE_TRITON_TIMEOUT_SECONDS" ($root.Values.triton.clientTimeoutSeconds | toString) }}
{{- end }}
{{- end }}
{{- if eq $name "retrieval" }}
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
{{- range $key, $value := $svc.env }}
{{- $_ := set $env $key ($value | toString) }}
{{- end }}
{{- $_ := set $env "LOUPE_LISTEN_HOST" "0.0.0.0" }}
{{- $_ := set $env (printf "LOUPE_%s_PORT" $upper) ($svc.grpcPort | toString) }}
{{- $_ := set $env (printf "LOUPE_%s_METRICS_PORT" $upper) ($svc.metricsPort | toString) }}
{{- if has $name (splitList " " (include "loupe.modelServiceNames" $root)) }}
{{- $_ := set $env "LOUPE_MODEL_REPOSITORY" $root.Values.modelRepository.mountPath }}
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

{{/* Refuse values that would render a broken or unsafe release, naming what to change. */}}
{{- define "loupe.validate" -}}
{{- $known := splitList " " (include "loupe.serviceNames" .) }}
{{- range $name, $_ := .Values.services }}
{{- if not (has $name $known) }}
{{- fail (printf "services.%s: unknown service; expected one of %s" $name (join ", " $known)) }}
{{- end }}
{{- end }}
{{- range $name := $known }}
{{- if not (hasKey $.Values.services $name) }}
{{- fail (printf "services.%s: missing; every Loupe service must be configured" $name) }}
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
