{{/*
One entry of .Values.services: its ConfigMap, Deployment and Service. Every entry has the same
shape; what differs comes from its values (and the few lines below keyed on its name or on the
program it runs). The key names the values (retrievalWriter), the component names the objects
and labels (retrieval-writer), the program is what the pod runs (`loupe serve retrieval`).
Usage: include "loupe.service" (list $ "gateway")
*/}}
{{- define "loupe.service" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $svc := index $root.Values.services $name }}
{{- $component := include "loupe.serviceComponent" $name }}
{{- $program := include "loupe.serviceProgram" . }}
{{- $fullname := include "loupe.componentName" (list $root $component) }}
{{- $isModel := has $program (splitList " " (include "loupe.modelServiceNames" $root)) }}
{{- $embedded := and (eq $name "retrieval") $root.Values.milvus.embedded }}
{{- $config := include "loupe.serviceConfigMap" (list $root $name) }}
{{- $tls := $root.Values.tls.enabled }}
{{- /* Kubernetes' gRPC probes speak no TLS: with TLS on they ask the plaintext health port. */}}
{{- $probePort := ternary $root.Values.tls.healthPort $svc.grpcPort $tls }}
{{- $secretEnv := list }}
{{- if and (has $program (list "gateway" "retrieval")) $root.Values.redis.url }}
{{- $secretEnv = append $secretEnv (list "LOUPE_REDIS_PASSWORD" $root.Values.secrets.redisPasswordKey) }}
{{- end }}
{{- if and (eq $program "retrieval") (not $root.Values.milvus.embedded) }}
{{- $secretEnv = append $secretEnv (list "LOUPE_MILVUS_TOKEN" $root.Values.secrets.milvusTokenKey) }}
{{- end }}
{{- $usesSecret := gt (len $secretEnv) 0 }}
{{ $config }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
spec:
  {{- if not $svc.autoscaling.enabled }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "loupe.selectorLabels" (list $root $component) | nindent 6 }}
  strategy:
    {{- if $embedded }}
    # milvus-lite is a single writer: the old pod must be gone before the new one opens the file.
    type: Recreate
    {{- else if $svc.strategy }}
    {{- toYaml $svc.strategy | nindent 4 }}
    {{- else }}
    type: RollingUpdate
    rollingUpdate:
      # Capacity never drops during a rollout; one extra pod at a time.
      maxUnavailable: 0
      maxSurge: 1
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "loupe.selectorLabels" (list $root $component) | nindent 8 }}
        app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
        app.kubernetes.io/part-of: loupe
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # A changed ConfigMap or Secret rolls the pods: the services read env only at start-up.
        checksum/config: {{ $config | sha256sum }}
        {{- if and $usesSecret (not $root.Values.secrets.existingSecret) }}
        checksum/secret: {{ include "loupe.secret" $root | sha256sum }}
        {{- end }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "loupe.serviceAccountName" (list $root $component $svc.serviceAccount) }}
      automountServiceAccountToken: {{ $root.Values.automountServiceAccountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- with (default $root.Values.nodeSelector $svc.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $svc.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.affinity $svc.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.topologySpreadConstraints $svc.topologySpreadConstraints) }}
      topologySpreadConstraints:
        {{- include "loupe.topologySpread" (list $root $component .) | nindent 8 }}
      {{- end }}
      {{- if and $isModel (eq $root.Values.modelRepository.source "image") }}
      initContainers:
        {{- include "loupe.modelRepositoryInit" $root | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "loupe.imageRef" (list $root.Values.image $root) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: [{{ $program | quote }}]
          ports:
            - name: grpc
              containerPort: {{ $svc.grpcPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $svc.metricsPort }}
              protocol: TCP
            {{- if $tls }}
            - name: health
              containerPort: {{ $root.Values.tls.healthPort }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $fullname }}
            {{- if and (eq $program "gateway") $root.Values.originals.uri $root.Values.originals.existingSecret }}
            # The originals store's credentials (AWS_ACCESS_KEY_ID, ...), read by s3fs / fsspec.
            - secretRef:
                name: {{ $root.Values.originals.existingSecret }}
            {{- end }}
          {{- with $secretEnv }}
          env:
            {{- range . }}
            - name: {{ index . 0 }}
              valueFrom:
                secretKeyRef:
                  name: {{ include "loupe.secretName" $root }}
                  key: {{ index . 1 }}
            {{- end }}
          {{- end }}
          startupProbe:
            grpc:
              port: {{ $probePort }}
            {{- include "loupe.startupProbe" (list $root $name) | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          livenessProbe:
            grpc:
              port: {{ $probePort }}
              {{- with $root.Values.probes.liveness.grpcService }}
              service: {{ . | quote }}
              {{- end }}
            {{- toYaml (omit $root.Values.probes.liveness "grpcService") | nindent 12 }}
          {{- if $root.Values.preStopSleepSeconds }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ $root.Values.preStopSleepSeconds | quote }}]
          {{- end }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $isModel }}
            {{- include "loupe.modelRepositoryMount" $root | nindent 12 }}
            {{- end }}
            {{- if $embedded }}
            - name: data
              mountPath: /data
            {{- end }}
            {{- if $tls }}
            {{- include "loupe.tlsMount" $root | nindent 12 }}
            {{- end }}
            {{- if and (eq $program "gateway") (include "loupe.authKeys" $root) }}
            {{- include "loupe.apiKeysMount" $root | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.tmpSizeLimit }}
        {{- if $isModel }}
        {{- include "loupe.modelRepositoryVolume" $root | nindent 8 }}
        {{- end }}
        {{- if $embedded }}
        - name: data
          {{- if $root.Values.milvus.persistence.enabled }}
          persistentVolumeClaim:
            claimName: {{ default (printf "%s-data" $fullname) $root.Values.milvus.persistence.existingClaim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- end }}
        {{- if $tls }}
        {{- include "loupe.tlsVolume" (list $root $name) | nindent 8 }}
        {{- end }}
        {{- if and (eq $program "gateway") (include "loupe.authKeys" $root) }}
        {{- include "loupe.apiKeysVolume" $root | nindent 8 }}
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
  {{- with $svc.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if eq $name "gateway" }}
  type: {{ $svc.service.type }}
  {{- if and (eq $svc.service.type "LoadBalancer") $svc.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges:
    {{- toYaml $svc.service.loadBalancerSourceRanges | nindent 4 }}
  {{- end }}
  {{- else }}
  # Backends are reached only from inside the release.
  type: ClusterIP
  {{- end }}
  selector:
    {{- include "loupe.selectorLabels" (list $root $component) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $svc.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if or (ne $name "gateway") (eq $svc.service.type "ClusterIP") }}
    - name: metrics
      port: {{ $svc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- if and (eq $name "gateway") (ne $svc.service.type "ClusterIP") }}
---
# The public gateway Service carries the gRPC API only; metrics stay inside the cluster.
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}-metrics
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "loupe.selectorLabels" (list $root $component) | nindent 4 }}
  ports:
    - name: metrics
      port: {{ $svc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}
{{- end }}

{{/* The ConfigMap of one entry's LOUPE_* environment. */}}
{{- define "loupe.serviceConfigMap" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $component := include "loupe.serviceComponent" $name }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "loupe.componentName" (list $root $component) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
data:
  {{- range $key, $value := include "loupe.serviceEnv" (list $root $name) | fromYaml }}
  {{ $key }}: {{ $value | quote }}
  {{- end }}
{{- end }}
