{{/*
The batch Jobs of the chart: clients of the release's gateway that run one `loupe` command per
pod (the index Job's backfill, the migration's re-index shards, its switch and its one-shot
actions). They share one shape: the services image (or the block's own image), the block's own
ServiceAccount, the chart's restricted pod, scheduling that falls back to the chart-wide values,
an API key from a Secret (LOUPE_API_KEY), object store credentials from Secrets (envFrom, and a
GCP key file mounted read-only), the release's CA with TLS on, and a /tmp emptyDir. Never a
credential in the arguments: argv shows in `ps` and in the pod spec.

Usage: include "loupe.clientJob" (dict
  "root" $                 the chart's root context
  "component" "index-job"  the app.kubernetes.io/component of the Job and its pods
  "name" NAME              the Job's name
  "job" .Values.indexJob   the values block (fields below)
  "container" "index"      the container's name
  "command" (list ...)     the command
  "args" (list ...)        its arguments, one string each
  "shards" N               N > 0: an Indexed Job of N completions (JOB_COMPLETION_INDEX set,
                           per-index retries); 0: one pod, one completion
  "backoffLimit" N         with shards 0: pod failures tolerated before the Job fails
  "env" (list ...)         EnvVars of the Job itself (set before the block's env)
  "secrets" (list ...)     optional: more Secrets whose keys become env vars (envFrom)
  "keyComment" TEXT        why this Job needs its API key, and which role
  "comments" (list ...)    comment lines written above spec (what the Job does))
Fields read from the block: image (optional: repository/tag/digest, empty: the services
image), parallelism, suspend, backoffLimitPerIndex, maxFailedIndexes, backoffLimit,
podFailurePolicy, ttlSecondsAfterFinished, activeDeadlineSeconds, apiKey, credentials, env,
serviceAccount, resources, tmpSizeLimit, nodeSelector, tolerations, affinity,
priorityClassName, podAnnotations.
*/}}
{{- define "loupe.clientJob" -}}
{{- $root := .root }}
{{- $job := .job }}
{{- $shards := int64 .shards }}
{{- $gcpSecret := $job.credentials.gcpServiceAccountSecret }}
{{- $gcpDir := "/var/run/secrets/loupe/gcp" }}
{{- $image := $root.Values.image }}
{{- with $job.image }}
{{- if .repository }}
{{- $image = merge (dict) (deepCopy .) (dict "pullPolicy" $root.Values.image.pullPolicy) }}
{{- end }}
{{- end }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root .component) | nindent 4 }}
spec:
  {{- range .comments }}
  # {{ . }}
  {{- end }}
  {{- if gt $shards 0 }}
  completionMode: Indexed
  completions: {{ $shards }}
  parallelism: {{ int64 $job.parallelism }}
  {{- else }}
  # One pod at a time, one completion.
  completions: 1
  parallelism: 1
  {{- end }}
  suspend: {{ $job.suspend }}
  {{- if gt $shards 0 }}
  # A failed shard is retried on its own; a shard that fails backoffLimitPerIndex + 1 times is
  # marked failed and the others go on, until more than maxFailedIndexes shards (or backoffLimit
  # pods in all) have failed. Re-running a shard is safe: stored items with the same bytes are
  # skipped without being embedded again.
  backoffLimitPerIndex: {{ int64 $job.backoffLimitPerIndex }}
  maxFailedIndexes: {{ min (int64 $job.maxFailedIndexes) $shards }}
  backoffLimit: {{ int64 $job.backoffLimit }}
  {{- else }}
  backoffLimit: {{ int64 .backoffLimit }}
  {{- end }}
  {{- with $job.podFailurePolicy.rules }}
  # With a podFailurePolicy, a failed pod is replaced only once it has fully terminated
  # (podReplacementPolicy Failed, Kubernetes 1.29+): two pods for the same work never overlap.
  podFailurePolicy:
    rules:
      {{- toYaml . | nindent 6 }}
  {{- end }}
  {{- if and (not (kindIs "invalid" $job.ttlSecondsAfterFinished)) (ne (toString $job.ttlSecondsAfterFinished) "") }}
  ttlSecondsAfterFinished: {{ int64 $job.ttlSecondsAfterFinished }}
  {{- end }}
  {{- with $job.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ int64 . }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "loupe.selectorLabels" (list $root .component) | nindent 8 }}
        app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
        app.kubernetes.io/part-of: loupe
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with (merge (dict) $job.podAnnotations $root.Values.podAnnotations) }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      # Per-index retries need Never: a failed pod is replaced by a new pod for the same index.
      restartPolicy: Never
      # Its own ServiceAccount (serviceaccount.yaml), e.g. with an IAM role for the bucket.
      serviceAccountName: {{ include "loupe.serviceAccountName" (list $root .component $job.serviceAccount) }}
      automountServiceAccountToken: {{ $root.Values.automountServiceAccountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.priorityClassName $job.priorityClassName) }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with (default $root.Values.nodeSelector $job.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $job.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.affinity $job.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .container }}
          image: {{ include "loupe.imageRef" (list $image $root) }}
          imagePullPolicy: {{ $image.pullPolicy }}
          command: {{ toJson .command }}
          args:
            {{- range .args }}
            - {{ . | quote }}
            {{- end }}
          env:
            {{- if gt $shards 0 }}
            # Set by the Job controller as well; defined here so that the args' $(...) reference
            # is resolved from the container's own env.
            - name: JOB_COMPLETION_INDEX
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
            {{- end }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- if $gcpSecret }}
            - name: GOOGLE_APPLICATION_CREDENTIALS
              value: {{ printf "%s/%s" $gcpDir $job.credentials.gcpServiceAccountKey | quote }}
            {{- end }}
            {{- with $job.apiKey.existingSecret }}
            # {{ $.keyComment }}
            - name: LOUPE_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ . }}
                  key: {{ $job.apiKey.key }}
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            # The gateway serves TLS: trust the release's CA (no client certificate needed).
            - name: LOUPE_TLS_CA
              value: {{ printf "%s/ca.crt" $root.Values.tls.mountPath | quote }}
            {{- end }}
            {{- with $job.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with (concat (list $job.credentials.existingSecret) (.secrets | default list)) | compact | uniq }}
          # Every key of the Secrets becomes an env var (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
          # AWS_ENDPOINT_URL, ...), read by s3fs / fsspec.
          envFrom:
            {{- range . }}
            - secretRef:
                name: {{ . }}
            {{- end }}
          {{- end }}
          resources:
            {{- toYaml $job.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $gcpSecret }}
            - name: gcp-credentials
              mountPath: {{ $gcpDir }}
              readOnly: true
            {{- end }}
            {{- if $root.Values.tls.enabled }}
            - name: tls-ca
              mountPath: {{ $root.Values.tls.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ default $root.Values.tmpSizeLimit $job.tmpSizeLimit }}
        {{- if $gcpSecret }}
        - name: gcp-credentials
          secret:
            secretName: {{ $gcpSecret }}
            items:
              - key: {{ $job.credentials.gcpServiceAccountKey }}
                path: {{ $job.credentials.gcpServiceAccountKey }}
            # Readable by the pod's group (fsGroup), not by others.
            defaultMode: 0440
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        {{- include "loupe.tlsCaVolume" $root | nindent 8 }}
        {{- end }}
{{- end }}

{{/*
The NetworkPolicy of a client Job's pods: no ingress (they serve nothing); egress (when
enabled) to DNS, the release's gateway, and `egress` ({to, ports}: the object store, HTTP(S)
servers).
Usage: include "loupe.clientJobNetworkPolicy" (list $ "index-job" .Values.networkPolicy.egress.indexJob "the manifest and the images")
*/}}
{{- define "loupe.clientJobNetworkPolicy" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $store := index . 2 }}
{{- $np := $root.Values.networkPolicy }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "loupe.componentName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "loupe.selectorLabels" (list $root $component) | nindent 6 }}
  # No ingress rule: the Job's pods serve nothing.
  policyTypes:
    - Ingress
    {{- if $np.egress.enabled }}
    - Egress
    {{- end }}
  {{- if $np.egress.enabled }}
  egress:
    - to:
        {{- toYaml $np.egress.dns | nindent 8 }}
      ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
    - to:
        - podSelector:
            matchLabels:
              {{- include "loupe.selectorLabels" (list $root "gateway") | nindent 14 }}
      ports:
        - port: {{ $root.Values.services.gateway.grpcPort }}
          protocol: TCP
    # {{ index . 3 }}: object store, HTTP(S) servers.
    - ports:
        {{- range $store.ports }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
      {{- with $store.to }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- end }}
{{- end }}

{{/* The components of the client Jobs rendered: index-job, reindex (the migration). */}}
{{- define "loupe.clientJobComponents" -}}
{{- $components := list }}
{{- if .Values.indexJob.enabled }}
{{- $components = append $components "index-job" }}
{{- end }}
{{- if .Values.migration.enabled }}
{{- $components = append $components "reindex" }}
{{- end }}
{{- join " " $components }}
{{- end }}
