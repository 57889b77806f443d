{{/* Full name of the release's objects. */}}
{{- define "kubemaas.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubemaas.serviceAccountName" -}}
{{- default (include "kubemaas.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubemaas.selectorLabels" -}}
app.kubernetes.io/name: kubemaas-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kubemaas.labels" -}}
{{ include "kubemaas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
