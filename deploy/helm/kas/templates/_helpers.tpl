{{/* Name of the release's objects: the release name, with the chart name unless it already holds it. */}}
{{- define "kas.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kas.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kas.labels" -}}
{{ include "kas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kas.secretName" -}}
{{- default (printf "%s-secrets" (include "kas.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* One replica without PostgreSQL keeps its SQLite control plane on a volume claim. */}}
{{- define "kas.persistent" -}}
{{- if not .Values.controlplane.url -}}true{{- end -}}
{{- end -}}

{{/* Settings that cannot work together fail the render with the reason. */}}
{{- define "kas.validate" -}}
{{- $v := .Values -}}
{{- if gt (int $v.replicaCount) 1 -}}
{{- if not $v.redis.url -}}{{- fail "replicaCount > 1 needs redis.url: the replicas share the agent registry in Redis" -}}{{- end -}}
{{- if not $v.controlplane.url -}}{{- fail "replicaCount > 1 needs controlplane.url: the replicas share the control plane in PostgreSQL" -}}{{- end -}}
{{- if not (or $v.k8sProxy.tls.secretName $v.k8sProxy.plaintext) -}}{{- fail "replicaCount > 1 needs k8sProxy.tls.secretName (or k8sProxy.plaintext behind a TLS ingress): each replica would otherwise generate its own CA" -}}{{- end -}}
{{- end -}}
{{- if and $v.k8sProxy.tls.secretName $v.k8sProxy.plaintext -}}{{- fail "set k8sProxy.tls.secretName or k8sProxy.plaintext, not both" -}}{{- end -}}
{{- with $v.redis.url -}}{{- if not (regexMatch "^(redis|unix)://" .) -}}{{- fail "redis.url must start with redis:// (or unix://)" -}}{{- end -}}{{- end -}}
{{- with $v.controlplane.url -}}{{- if not (regexMatch "^postgres(ql)?://" .) -}}{{- fail "controlplane.url must be a postgres:// URL" -}}{{- end -}}{{- end -}}
{{- with $v.k8sProxy.url -}}{{- if not (regexMatch "^https?://[^/]+" .) -}}{{- fail "k8sProxy.url must be an absolute http(s) URL" -}}{{- end -}}{{- end -}}
{{- range $k, $s := dict "privateSecret" $v.secrets.privateSecret "applicationSecret" $v.secrets.applicationSecret -}}
{{- if and $s (lt (len $s) 32) -}}{{- fail (printf "secrets.%s must be at least 32 bytes" $k) -}}{{- end -}}
{{- end -}}
{{- if not (has $v.logFormat (list "json" "text")) -}}{{- fail "logFormat must be json or text" -}}{{- end -}}
{{- end -}}

{{/* A secret value: the one given, else the one already in the cluster, else a new random one. */}}
{{- define "kas.secretValue" -}}
{{- $given := index . 0 -}}{{- $existing := index . 1 -}}{{- $key := index . 2 -}}
{{- if $given -}}{{- $given -}}
{{- else if and $existing (index $existing.data $key) -}}{{- index $existing.data $key | b64dec -}}
{{- else -}}{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
