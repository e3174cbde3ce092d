{{/*
Client-side load balancing (values: clientLoadBalancing). A Service's cluster IP is one
address: gRPC keeps one HTTP/2 connection to it, which kube-proxy pins to one pod, so replicas
added later got little traffic and the HPAs barely helped. With it on, a headless Service
(clusterIP: None) beside each balanced workload's Service resolves to every ready pod; its
callers dial it as dns:///NAME.NAMESPACE.svc.DOMAIN:PORT and spread calls round_robin over
them (the gateway over detection, embedding, retrieval's readers and ranking; detection and
embedding over Triton), and every Loupe server closes a connection after
LOUPE_GRPC_MAX_CONNECTION_AGE_SECONDS, so a client resolves again and finds new pods. The
plain Services stay (probes, metrics, the index Job, anything else that dials them).
*/}}

{{/* The entries of .Values.services whose callers balance over their pods. The retrieval
writer is one pod by design. */}}
{{- define "loupe.balancedServices" -}}
detection embedding retrieval ranking
{{- end }}

{{/* The headless Service's name. Usage: include "loupe.headlessName" (list $ "ranking") */}}
{{- define "loupe.headlessName" -}}
{{- $component := include "loupe.serviceComponent" (index . 1) }}
{{- include "loupe.componentName" (list (index . 0) (printf "%s-headless" $component)) }}
{{- end }}

{{/* The name a caller dials for a workload, without the port: the headless Service's fully
qualified name when balancing is on, else the Service's name. Certificates carry both.
Usage: include "loupe.dialledHost" (list $ "ranking") */}}
{{- define "loupe.dialledHost" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- if $root.Values.clientLoadBalancing.enabled }}
{{- printf "%s.%s.svc.%s" (include "loupe.headlessName" .) $root.Release.Namespace $root.Values.clientLoadBalancing.clusterDomain }}
{{- else }}
{{- include "loupe.componentName" (list $root (include "loupe.serviceComponent" $name)) }}
{{- end }}
{{- end }}

{{/* The gRPC target a caller dials for a workload. Usage: include "loupe.dialledAddress"
(list $ "ranking" 50055) */}}
{{- define "loupe.dialledAddress" -}}
{{- $host := include "loupe.dialledHost" (list (index . 0) (index . 1)) }}
{{- if (index . 0).Values.clientLoadBalancing.enabled }}
{{- printf "dns:///%s:%v" $host (index . 2) }}
{{- else }}
{{- printf "%s:%v" $host (index . 2) }}
{{- end }}
{{- end }}

{{/* The DNS names of a workload's headless Service, for its certificate (none when
balancing is off or the workload is not balanced). Usage: include "loupe.headlessDnsNames"
(list $ "ranking") | fromYamlArray */}}
{{- define "loupe.headlessDnsNames" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $names := list }}
{{- if and $root.Values.clientLoadBalancing.enabled (has $name (append (splitList " " (include "loupe.balancedServices" $root)) "triton")) }}
{{- $headless := include "loupe.headlessName" . }}
{{- $ns := $root.Release.Namespace }}
{{- $names = list $headless (printf "%s.%s" $headless $ns) (printf "%s.%s.svc" $headless $ns) (printf "%s.%s.svc.%s" $headless $ns $root.Values.clientLoadBalancing.clusterDomain) }}
{{- end }}
{{- toYaml $names }}
{{- end }}

{{/* One headless Service: the gRPC port only (metrics are scraped through the plain
Service), ready pods only. Usage: include "loupe.headlessService" (list $ "ranking" 50055) */}}
{{- define "loupe.headlessService" -}}
{{- $root := index . 0 }}
{{- $component := include "loupe.serviceComponent" (index . 1) }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "loupe.headlessName" (list $root (index . 1)) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loupe.labels" (list $root $component) | nindent 4 }}
spec:
  type: ClusterIP
  clusterIP: None
  publishNotReadyAddresses: false
  selector:
    {{- include "loupe.selectorLabels" (list $root $component) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ index . 2 }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- end }}
